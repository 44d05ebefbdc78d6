"""Smoke tests of the benchmarks (tiny sizes; speed itself is never asserted here)."""

import json

import pytest

from jaxrm import bench
from jaxrm.cli import _commands


def test_cli_parses_bench_commands():
    args = _commands().parse_args(["bench", "losses", "--sizes", "1e3", "--repeats", "1"])
    assert args.benchmark == "losses"
    assert args.options == ["--sizes", "1e3", "--repeats", "1"]


def test_unknown_benchmark_is_refused():
    with pytest.raises(ValueError, match="unknown benchmark"):
        bench.benchmark_module("nope")


def test_losses_benchmark_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "losses"
    result = bench.run("losses", ["--sizes", "1000", "--repeats", "1", "--dtypes", "float32",
                                  "--losses", "bradley_terry", "all_pairs", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    implementations = {(r["loss"], r["implementation"]) for r in rows}
    assert ("bradley_terry", "jaxrm (jit)") in implementations
    assert {r["list_size"] for r in rows if r["loss"] == "all_pairs"} == {4, 8}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows)
    assert "bradley_terry" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["floors"]["n"] == 1000


def test_every_loss_has_a_benchmark_case():
    from jaxrm import losses

    module = bench.benchmark_module("losses")
    reductions_and_metrics = {"masked_mean", "accuracy"}
    names = {name for name in losses.__all__ if name.islower()} - reductions_and_metrics
    assert names <= set(module.LOSSES)


def test_train_and_peers_tables_render():
    train = bench.benchmark_module("train")
    row = {"model": "minilm", "devices": 1, "dtype": "bfloat16", "parameters": 22.7e6, "compile_s": 7.0, "step_median_s": 2.0,
           "step_min_s": 1.9, "step_max_s": 2.1, "pairs_per_s": 8.0, "tokens_per_s": 4096.0, "step_flops": 5e11,
           "achieved_flops_per_s": 2.5e11, "matmul_peak_flops_per_s": 2.9e11, "fraction_of_matmul_peak": 0.86,
           "temp_bytes": 2**30, "peak_rss_bytes": 2**31, "loadavg": ["1.0", "1.0", "1.0"]}
    assert "| minilm | 1 | bfloat16 |" in train.markdown({"rows": [row], "compilations": None})

    peers = bench.benchmark_module("peers")
    side = {"steady_pairs_per_s": 1.0, "steady_tokens_per_s": 200.0, "wall_seconds": 100.0, "heldout_accuracy": 0.6}
    result = {"steps": 60, "settings": {"batch_size": 16, "max_length": 256}, "counts": {}, "loadavg": {},
              "trl": side, "jaxrm": {**side, "steady_pairs_per_s": 3.0},
              "ratios": {"steady_pairs_per_s": 3.0, "steady_tokens_per_s": 1.0, "whole_process": 1.0,
                         "accuracy_difference": 0.0},
              "floors": {"steady_state_2.5x": False}}
    assert "**3.00×**" in peers.markdown(result)
    result.update(counts={"heldout": {"kept": 100}}, accuracy_standard_error=peers.accuracy_standard_error(0.5, 100))
    assert "Standard error of one held-out accuracy: 0.0500 (100 pairs)" in peers.markdown(result)


def test_peers_synthetic_stand_in_is_hh_shaped_and_read_as_pairs(tmp_path):
    from jaxrm.data.readers import read_records
    from jaxrm.data.records import PairRecord

    peers = bench.benchmark_module("peers")
    path = peers.write_synthetic_dialogues(tmp_path / "sub" / "pairs.jsonl", count=50)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 50
    for record in lines:
        human = record["chosen"].rsplit("\n\nAssistant:", 1)[0]
        assert human.startswith("\n\nHuman: ") and record["rejected"].startswith(human + "\n\nAssistant:")
        assert record["chosen"] != record["rejected"]
    pairs, _ = read_records(path)
    assert len(pairs) == 50 and all(isinstance(pair, PairRecord) for pair in pairs)
