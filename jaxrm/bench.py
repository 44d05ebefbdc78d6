"""``jaxrm bench losses|train|peers``: the command-line side of the benchmarks in ``benchmarks/``.

The benchmark code lives next to the package, in the repository's ``benchmarks/`` folder (it is not
installed with the wheel): this module finds that folder from a source checkout and runs the named
benchmark's ``main``. See ``benchmarks/RESULTS.md`` for what each measures and the committed numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = ("losses", "train", "peers")
REPO_ROOT = Path(__file__).resolve().parent.parent


def benchmark_module(name: str):
    """The ``benchmarks.<name>`` module of this checkout."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {BENCHMARKS}")
    if not (REPO_ROOT / "benchmarks" / f"{name}.py").is_file():
        raise FileNotFoundError(f"{REPO_ROOT / 'benchmarks'} not found: `jaxrm bench` runs from a source checkout "
                                "of jaxrm (git clone, then pip install -e '.[bench]')")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def add_commands(commands) -> None:
    """Adds ``bench BENCHMARK [options]`` to an argparse sub-parser collection; the options are the
    benchmark's own (``jaxrm bench losses --help``)."""
    bench = commands.add_parser("bench", help="benchmarks: losses, train-step throughput, TRL side by side")
    bench.add_argument("benchmark", choices=BENCHMARKS, help=", ".join(f"{k}: {v}" for k, v in SUMMARIES.items()))
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's options (--help lists them)")


SUMMARIES = {
    "losses": "every loss, forward and forward+backward, next to PyTorch eager and a bandwidth roofline",
    "train": "train-step throughput, compile time, memory and FLOP/s against a matmul peak",
    "peers": "TRL RewardTrainer and jaxrm on the same MiniLM checkpoint, data and steps",
}


def write_result(result: dict, out: Path, markdown: str) -> None:
    """Writes a benchmark's ``<out>.json`` (the result) and ``<out>.md`` (its table)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown)


def run(benchmark: str, options: list[str]) -> dict:
    """Runs ``jaxrm bench <benchmark> <options>``; returns the benchmark's result."""
    module = benchmark_module(benchmark)
    parser = argparse.ArgumentParser(prog=f"jaxrm bench {benchmark}", description=SUMMARIES[benchmark])
    module.add_arguments(parser)
    return module.main(parser.parse_args(options))
