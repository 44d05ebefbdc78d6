"""Loss-function benchmark: every loss of `jaxrm.losses`, jit-compiled, next to PyTorch eager and a roofline.

    jaxrm bench losses [--sizes 1e3 1e4 1e5 1e6 1e7] [--repeats 7] [--out benchmarks/results/losses]
    python -m benchmarks.losses ...

For each loss, each size N (pairs, or lists of K ∈ {4, 8} for the listwise losses) and each dtype
(float32, bfloat16): the wall time of the forward pass (per-example losses, then their sum, so that
nothing is left unevaluated) and of forward + backward (``value_and_grad`` of the sum with respect to
every reward array, as in training). ``bradley_terry`` is timed as TRL writes it, the mean loss
(``reduction="mean"``), and also as per-pair losses then summed (`JAXRM_VARIANTS`). Next to them, in the
same process:

- PyTorch eager, written as TRL (``-logsigmoid(chosen - rejected - margin).mean()``) and OpenRLHF
  (``PairWiseLoss``: the same; ``LogExpLoss``: ``log(1 + exp(rejected - chosen)).mean()``) write the
  Bradley–Terry loss; skipped when torch is not installed;
- a roofline: the memory bandwidth JAX reaches on this machine reading one large float32 array and
  writing another (``y = 2x + 1``), sampled through the same run: the higher of the medians of its two
  readings, into fresh buffers and in place (see `BandwidthMeter`).

Effective bytes are what a loss must move at the least: its inputs read once and its outputs (per
example losses, or the gradients) written once. The fraction of the roofline is effective bytes/s
divided by the measured bandwidth. Times are median / min / max over ``repeats`` after `WARMUPS` untimed calls
(more while calls still page-fault).
Results go to ``<out>.json``, ``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm import losses
from jaxrm.bench import write_result
from jaxrm.host import trim_heap

DEFAULT_SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
LIST_SIZES = (4, 8)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
#: Largest number of elements one listwise case may build ([N, K, K] pair matrices): beyond it a case is
#: skipped (and said so) rather than exhausting the memory of a shared machine.
MAX_LISTWISE_PAIR_ELEMENTS = 8e8


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed function: which loss, implementation, pass, size and dtype, and the bytes it must move."""

    loss: str
    implementation: str
    mode: str  # "fwd" or "fwd+bwd"
    n: int
    list_size: int | None
    dtype: str
    effective_bytes: int


WARMUPS = 3
"""Untimed calls before the timed ones, at the least: the first compiles, and the next ones' outputs still grow the
heap (glibc's, tuned by `jaxrm.host` so freed buffers are reused). At 10⁷ pairs the second and third forward +
backward calls page-faulted 144-206 MB of fresh huge pages and took 125-206 ms, the eight after them none, at 9-11
ms; in some processes the growth lasts longer (the mean's forward + backward on an AMD EPYC Zen 4: five calls in a
row of 72-135 ms, 36-72 huge-page faults each, then none at 5-7 ms), so warming goes on while calls still fault
(`MAX_WARMUPS`). (Slow outliers of 100-260 ms still turn up in some runs on a noisy host; the median is what the
floors read.)"""
MAX_WARMUPS = 20
"""Untimed calls at the most: past `WARMUPS`, one more while the last one page-faulted more than `QUIET_FAULTS`
times (fresh memory taken from the OS: the heap still growing to the call's steady state)."""
QUIET_FAULTS = 8


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timings(run: Callable[[], object], repeats: int) -> dict:
    """Median / min / max seconds of ``run`` (which blocks until its result is ready) over ``repeats`` calls, after
    `WARMUPS` untimed calls and as many more (up to `MAX_WARMUPS`) as still page-fault; ``warmups`` says how many."""
    warmups = 0
    while warmups < MAX_WARMUPS:
        before = _page_faults()
        run()
        warmups += 1
        faulted = _page_faults() - before
        if warmups >= WARMUPS and faulted <= QUIET_FAULTS:
            break
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "warmups": warmups}


class BandwidthMeter:
    """Memory bandwidth of JAX on this machine, bytes/s of ``y = 2x + 1`` (one read, one write), two ways:

    - ``in_place``: 256 MiB float32 with the input donated, so the output reuses its buffer: the
      machine's streaming read + write bandwidth;
    - ``fresh_output``: 10^7 float32 (40 MB, the size of one gradient of the largest pairwise case)
      written to a new buffer on every call, as every jitted function returns its results. Buffers this
      large may be fresh pages from the OS, and then first-touch page faults, not DRAM, bound the rate.

    Each reading is the median of calls sampled in bursts through the run (`sample`: a long one at the start and
    the end, a short one before every case), as every loss's time is the median of its calls. This host's bandwidth
    swings for a few hundred milliseconds at a time: on an AMD EPYC Zen 4 the in-place reading was 52-56 GB/s
    in most runs and 100-105 GB/s in two of seven, while the loss timed a moment later ran at its usual 3.9-4.4
    ms; a single burst's best call, the roofline before, then put it at 43 and 51 % against 81-108 % in the
    other five runs.

    The roofline is the higher of the two medians (`roofline`): on one machine fresh buffers stay in a large L3
    and read faster than in place; on another the host pages idle memory out (a VM's DAMON reclaim), and fresh
    buffers read anywhere from 4 to 20 GB/s from one run to the next while in place holds at 25-30.
    """

    def __init__(self):
        self._in_place_input = jnp.ones((64 * 2**20,), jnp.float32)
        self._fresh_input = jnp.ones((10_000_000,), jnp.float32)
        self._in_place = jax.jit(lambda v: v * 2.0 + 1.0, donate_argnums=0)
        self._fresh = jax.jit(lambda v: v * 2.0 + 1.0)
        self.samples: dict[str, list[float]] = {"in_place": [], "fresh_output": []}
        self._fresh(self._fresh_input).block_until_ready()  # compiles
        self._in_place_input = self._in_place(self._in_place_input).block_until_ready()

    def sample(self, calls: int) -> None:
        """``calls`` timed calls of each way, recorded in `samples` (bytes/s)."""
        for _ in range(calls):
            start = time.perf_counter()
            self._in_place_input = self._in_place(self._in_place_input).block_until_ready()
            self.samples["in_place"].append(2 * self._in_place_input.nbytes / (time.perf_counter() - start))
        for _ in range(calls):
            start = time.perf_counter()
            self._fresh(self._fresh_input).block_until_ready()
            self.samples["fresh_output"].append(2 * self._fresh_input.nbytes / (time.perf_counter() - start))

    def readings(self) -> dict:
        """The median of each way's samples (bytes/s), the best in-place one beside them, and the count."""
        return {"in_place": statistics.median(self.samples["in_place"]),
                "fresh_output": statistics.median(self.samples["fresh_output"]),
                "in_place_best": max(self.samples["in_place"]), "calls": len(self.samples["in_place"])}


ROOFLINE_CALLS = (8, 2)
"""`BandwidthMeter.sample` calls of each way at the start and end of a run, and before each case."""


def roofline(rooflines: dict) -> float:
    """The bandwidth the fractions are taken against: the higher of `BandwidthMeter`'s two medians."""
    return max(rooflines["in_place"], rooflines["fresh_output"])


# --------------------------------------------------------------------------------------------
# The jaxrm side: inputs and a call for every loss.


def _pair_inputs(n: int, dtype, key: jax.Array) -> dict:
    chosen_key, rejected_key, margin_key = jax.random.split(key, 3)
    return {
        "chosen": jax.random.normal(chosen_key, (n,), jnp.float32).astype(dtype),
        "rejected": jax.random.normal(rejected_key, (n,), jnp.float32).astype(dtype),
        "margin": jax.random.uniform(margin_key, (n,), jnp.float32),
    }


def _tie_inputs(n: int, dtype, key: jax.Array) -> dict:
    a_key, b_key, outcome_key = jax.random.split(key, 3)
    return {
        "a": jax.random.normal(a_key, (n,), jnp.float32).astype(dtype),
        "b": jax.random.normal(b_key, (n,), jnp.float32).astype(dtype),
        "outcome": jax.random.randint(outcome_key, (n,), -1, 2, jnp.int32),
    }


def _list_inputs(n: int, list_size: int, dtype, key: jax.Array) -> dict:
    rewards_key, ranks_key = jax.random.split(key)
    ranks = jnp.argsort(jax.random.uniform(ranks_key, (n, list_size)), axis=-1).astype(jnp.int32)
    return {
        "rewards": jax.random.normal(rewards_key, (n, list_size), jnp.float32).astype(dtype),
        "ranks": ranks,
        "where": jnp.ones((n, list_size), bool).at[:, -1].set(jnp.arange(n) % 2 == 0),
    }


# name -> (kind, differentiable inputs, loss of the inputs dict). Every array an entry reads is in
# its inputs dict, so the effective bytes are the inputs' bytes plus the outputs'.
LOSSES: dict[str, tuple[str, tuple[str, ...], Callable[[dict], jax.Array]]] = {
    "bradley_terry": ("pair", ("chosen", "rejected"),
                      lambda x: losses.bradley_terry(x["chosen"], x["rejected"], margin=x["margin"],
                                                     reduction="mean")),
    "hinge": ("pair", ("chosen", "rejected"), lambda x: losses.hinge(x["chosen"], x["rejected"], margin=x["margin"])),
    "smoothed_bradley_terry": ("pair", ("chosen", "rejected"),
                               lambda x: losses.smoothed_bradley_terry(x["chosen"], x["rejected"], 0.1,
                                                                       margin=x["margin"])),
    "focal_bradley_terry": ("pair", ("chosen", "rejected"),
                            lambda x: losses.focal_bradley_terry(x["chosen"], x["rejected"], gamma=2.0,
                                                                 margin=x["margin"])),
    "rao_kupper": ("tie", ("a", "b"), lambda x: losses.rao_kupper(x["a"], x["b"], x["outcome"], 0.5)),
    "davidson": ("tie", ("a", "b"), lambda x: losses.davidson(x["a"], x["b"], x["outcome"], 0.0)),
    "all_pairs": ("list", ("rewards",), lambda x: losses.all_pairs(x["rewards"], x["ranks"], where=x["where"])),
    "plackett_luce": ("list", ("rewards",),
                      lambda x: losses.plackett_luce(x["rewards"], x["ranks"], where=x["where"])),
    "centering": ("pair", ("chosen", "rejected"), lambda x: losses.centering(x["chosen"], x["rejected"])),
    "l2": ("pair", ("chosen",), lambda x: losses.l2(x["chosen"])),
    "preference_probability": ("pair", ("chosen", "rejected"),
                               lambda x: losses.preference_probability(x["chosen"], x["rejected"])),
}


JAXRM_IMPLEMENTATION = "jaxrm (jit)"
# loss name -> {implementation: loss of the inputs dict}: other ways to write a loss, timed beside it.
JAXRM_VARIANTS: dict[str, dict[str, Callable[[dict], jax.Array]]] = {
    "bradley_terry": {"jaxrm (jit, per-pair losses, then summed)":
                      lambda x: losses.bradley_terry(x["chosen"], x["rejected"], margin=x["margin"])},
}


def _used_inputs(name: str, inputs: dict) -> dict:
    """The arrays the loss actually reads (centering and l2 take no margin, l2 no rejected rewards)."""
    if name == "centering" or name == "preference_probability":
        return {k: inputs[k] for k in ("chosen", "rejected")}
    if name == "l2":
        return {"chosen": inputs["chosen"]}
    return inputs


def jax_functions(name: str, loss: Callable[[dict], jax.Array] | None = None) -> dict[str, Callable[[dict], object]]:
    """The jit-compiled forward and forward+backward of loss ``name`` (or of ``loss``, another way to write it),
    each taking the inputs dict."""
    _, differentiable, default = LOSSES[name]
    loss = loss or default

    def total(params, rest):
        return jnp.sum(loss({**rest, **params}))

    forward = jax.jit(lambda inputs: total({}, inputs))
    grad = jax.jit(jax.value_and_grad(total))

    def forward_backward(inputs):
        params = {k: inputs[k] for k in differentiable}
        rest = {k: v for k, v in inputs.items() if k not in differentiable}
        return grad(params, rest)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def effective_bytes(name: str, inputs: dict, mode: str) -> int:
    """Inputs read once; per-example losses (forward) or one gradient per differentiable input written once."""
    read = sum(value.nbytes for value in inputs.values())
    _, differentiable, _ = LOSSES[name]
    if mode == "fwd":
        return read  # the per-example losses are summed in the same fusion, never written
    return read + sum(inputs[k].nbytes for k in differentiable)


# --------------------------------------------------------------------------------------------
# The PyTorch side: the eager one-liners of TRL and OpenRLHF.


def torch_functions() -> dict[str, Callable] | None:
    try:
        import torch
    except ImportError:
        return None
    functional = torch.nn.functional

    def trl(chosen, rejected, margin):
        # trl.RewardTrainer.compute_loss with a margin column; OpenRLHF's PairWiseLoss is the same formula.
        return -functional.logsigmoid(chosen - rejected - margin).mean()

    def openrlhf_log_exp(chosen, rejected, margin):
        # OpenRLHF's LogExpLoss (no margin).
        return torch.log(1 + torch.exp(rejected - chosen)).mean()

    return {"torch eager (TRL / OpenRLHF PairWiseLoss)": trl, "torch eager (OpenRLHF LogExpLoss)": openrlhf_log_exp}


def torch_runs(function, inputs: dict, dtype: str):
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    chosen = torch.from_numpy(np.array(inputs["chosen"].astype(jnp.float32))).to(torch_dtype)
    rejected = torch.from_numpy(np.array(inputs["rejected"].astype(jnp.float32))).to(torch_dtype)
    margin = torch.from_numpy(np.array(inputs["margin"]))

    def forward():
        with torch.no_grad():
            return function(chosen, rejected, margin).item()

    def forward_backward():
        chosen_leaf = chosen.detach().requires_grad_()
        rejected_leaf = rejected.detach().requires_grad_()
        function(chosen_leaf, rejected_leaf, margin).backward()
        return chosen_leaf.grad.sum().item()

    return {"fwd": forward, "fwd+bwd": forward_backward}


# --------------------------------------------------------------------------------------------


def run(sizes=DEFAULT_SIZES, dtypes=tuple(DTYPES), repeats: int = 7, loss_names=tuple(LOSSES),
        torch_threads: int = 2, log=print) -> dict:
    """Measures everything; returns the JSON-ready result."""
    meter = BandwidthMeter()
    meter.sample(ROOFLINE_CALLS[0])
    peers = torch_functions()
    if peers is None:
        log("torch is not installed: PyTorch columns skipped (pip install 'jaxrm[bench]')")
    else:
        import torch

        torch.set_num_threads(torch_threads)
    rows = []
    key = jax.random.key(0)

    def record(case: Case, result: dict):
        rate = case.effective_bytes / result["median_s"]
        rows.append({**dataclasses.asdict(case), **result, "bytes_per_s": rate})
        log(f"{case.loss:<24} {case.implementation:<44} {case.mode:<8} N={case.n:<9}"
            f"{'' if case.list_size is None else f' K={case.list_size}':<5} {case.dtype:<9}"
            f"{result['median_s'] * 1e3:10.3f} ms  {rate / 1e9:7.2f} GB/s")

    for name in loss_names:
        kind = LOSSES[name][0]
        implementations = {JAXRM_IMPLEMENTATION: jax_functions(name)}
        for implementation, variant in JAXRM_VARIANTS.get(name, {}).items():
            implementations[implementation] = jax_functions(name, variant)
        for dtype in dtypes:
            for n in sizes:
                for list_size in (LIST_SIZES if kind == "list" else (None,)):
                    if kind == "list" and n * list_size * list_size > MAX_LISTWISE_PAIR_ELEMENTS:
                        log(f"{name} N={n} K={list_size}: skipped ({n * list_size**2:.0e} pair elements)")
                        continue
                    meter.sample(ROOFLINE_CALLS[1])
                    if kind == "pair":
                        inputs = _pair_inputs(n, DTYPES[dtype], key)
                    elif kind == "tie":
                        inputs = _tie_inputs(n, DTYPES[dtype], key)
                    else:
                        inputs = _list_inputs(n, list_size, DTYPES[dtype], key)
                    inputs = _used_inputs(name, inputs)
                    for implementation, functions in implementations.items():
                        for mode, function in functions.items():
                            case = Case(name, implementation, mode, n, list_size, dtype,
                                        effective_bytes(name, inputs, mode))
                            record(case, timings(lambda: jax.block_until_ready(function(inputs)), repeats))
                    if name == "bradley_terry" and peers is not None:
                        for implementation, peer in peers.items():
                            for mode, peer_run in torch_runs(peer, inputs, dtype).items():
                                case = Case(name, implementation, mode, n, None, dtype,
                                            effective_bytes(name, inputs, mode))
                                record(case, timings(peer_run, repeats))
                    del inputs
                    trim_heap()  # each case warms up from its own heap: the cases' growth does not pile up
    meter.sample(ROOFLINE_CALLS[0])
    rooflines = meter.readings()
    bandwidth = roofline(rooflines)
    log(f"roofline: {bandwidth / 1e9:.1f} GB/s, the higher of the medians of {rooflines['calls']} calls in place "
        f"({rooflines['in_place'] / 1e9:.1f} GB/s, best {rooflines['in_place_best'] / 1e9:.1f}) and to fresh buffers "
        f"({rooflines['fresh_output'] / 1e9:.1f} GB/s), y = 2x + 1, jax {jax.__version__}")
    for row in rows:
        row["fraction_of_roofline"] = row["bytes_per_s"] / bandwidth
        row["fraction_of_in_place_bandwidth"] = row["bytes_per_s"] / rooflines["in_place"]
    return {
        "machine": machine(),
        "roofline_bytes_per_s": bandwidth,
        "fresh_output_bandwidth_bytes_per_s": rooflines["fresh_output"],
        "in_place_bandwidth_bytes_per_s": rooflines["in_place"],
        "in_place_best_bandwidth_bytes_per_s": rooflines["in_place_best"],
        "roofline_calls": rooflines["calls"],
        "repeats": repeats,
        "rows": rows,
        "floors": floors(rows),
    }


def machine() -> dict:
    info = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": len(jax.devices()),
            "cpu_count": os.cpu_count(), "loadavg": Path("/proc/loadavg").read_text().split()[:3]
            if Path("/proc/loadavg").exists() else None}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def floors(rows: list[dict]) -> dict:
    """Issue 6's floors at the largest N measured: bradley_terry fwd+bwd (float32, with margin) reaches
    ≥ 50 % of the roofline and is ≥ 5× PyTorch eager (TRL's formula)."""
    selected = [r for r in rows if r["loss"] == "bradley_terry" and r["mode"] == "fwd+bwd" and r["dtype"] == "float32"]
    if not selected:
        return {}
    n = max(r["n"] for r in selected)
    ours = next(r for r in selected if r["n"] == n and r["implementation"] == JAXRM_IMPLEMENTATION)
    result = {"n": n, "fraction_of_roofline": ours["fraction_of_roofline"],
              "fraction_of_in_place_bandwidth": ours["fraction_of_in_place_bandwidth"],
              "roofline_floor_met": ours["fraction_of_roofline"] >= 0.5}
    trl = [r for r in selected if r["n"] == n and "TRL" in r["implementation"]]
    if trl:
        result["speedup_vs_torch"] = trl[0]["median_s"] / ours["median_s"]
        result["torch_floor_met"] = result["speedup_vs_torch"] >= 5
    return result


def markdown(result: dict) -> str:
    lines = [
        f"Roofline (JAX, y = 2x + 1): **{result['roofline_bytes_per_s'] / 1e9:.1f} GB/s**, the higher of the "
        f"medians of {result['roofline_calls']} calls sampled through the run: "
        f"{result['fresh_output_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s writing fresh 40 MB buffers (as every "
        f"jitted function returns results) and {result['in_place_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s in "
        f"place on 256 MiB (donated buffer; best call "
        f"{result['in_place_best_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s); load average at the start "
        f"{' '.join(result['machine']['loadavg'] or [])}. 'of roofline' is against it.",
        "",
        "| loss | implementation | pass | N | K | dtype | median ms | min ms | max ms | GB/s | of roofline |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['loss']} | {r['implementation']} | {r['mode']} | {r['n']:.0e} | {r['list_size'] or ''} | "
            f"{r['dtype']} | {r['median_s'] * 1e3:.3f} | {r['min_s'] * 1e3:.3f} | {r['max_s'] * 1e3:.3f} | "
            f"{r['bytes_per_s'] / 1e9:.2f} | {r['fraction_of_roofline']:.0%} |"
        )
    if result["floors"]:
        f = result["floors"]
        lines += ["", f"Floors at N = {f['n']:.0e} (bradley_terry with margin, float32, forward + backward): "
                      f"{f['fraction_of_roofline']:.0%} of the roofline (floor 50 %: "
                      f"{'met' if f['roofline_floor_met'] else 'NOT met'}; "
                      f"{f['fraction_of_in_place_bandwidth']:.0%} of the in-place bandwidth)"
                      + (f", {f['speedup_vs_torch']:.1f}× PyTorch eager (floor 5×: "
                         f"{'met' if f['torch_floor_met'] else 'NOT met'})" if "speedup_vs_torch" in f else "")
                      + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Time vs N, one line per implementation, for the pairwise losses' forward+backward in float32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for axis, dtype in zip(axes, DTYPES):
        axis.set_prop_cycle(color=plt.cm.tab20.colors)  # 17 lines: the default cycle's 10 colours repeat
        lines: dict[str, list] = {}
        for r in result["rows"]:
            if r["mode"] != "fwd+bwd" or r["dtype"] != dtype:
                continue
            label = r["loss"] if r["implementation"] == JAXRM_IMPLEMENTATION else f"{r['loss']}, {r['implementation']}"
            if r["list_size"]:
                label += f" K={r['list_size']}"
            lines.setdefault(label, []).append((r["n"], r["median_s"]))
        for label, points in sorted(lines.items()):
            n, seconds = zip(*sorted(points))
            axis.plot(n, seconds, marker="o", label=label, linestyle="--" if "torch" in label else "-")
        sizes = sorted({r["n"] for r in result["rows"]})
        pair_bytes = [20 * n for n in sizes]  # bradley_terry fwd+bwd: 3 float32 reads, 2 writes per pair
        axis.plot(sizes, [b / result["roofline_bytes_per_s"] for b in pair_bytes], color="black", linewidth=2,
                  label="roofline (bradley_terry bytes / measured bandwidth)")
        axis.set(xscale="log", yscale="log", xlabel="N (pairs, or lists)", title=f"forward + backward, {dtype}")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds (median)")
    axes[1].legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(result: dict, out: Path) -> None:
    write_result(result, out, markdown(result))
    plot(result, out.with_suffix(".png"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=float, nargs="+", default=DEFAULT_SIZES, help="N, pairs or lists")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=tuple(DTYPES))
    parser.add_argument("--losses", nargs="+", choices=tuple(LOSSES), default=tuple(LOSSES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/losses"),
                        help="output path without suffix: writes .json, .md and .png")


def main(args: argparse.Namespace) -> dict:
    result = run(sizes=tuple(int(n) for n in args.sizes), dtypes=tuple(args.dtypes), repeats=args.repeats,
                 loss_names=tuple(args.losses), torch_threads=args.torch_threads)
    write(result, args.out)
    print(markdown(result).splitlines()[-1])
    print(f"wrote {args.out}.json, .md, .png")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main(parser.parse_args())
