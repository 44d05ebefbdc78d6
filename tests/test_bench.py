"""Smoke tests of the benchmarks (tiny sizes; speed itself is never asserted here)."""

import json

import numpy as np
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
    assert ("bradley_terry", "jaxrm (jit, per-pair losses, then summed)") in implementations
    assert {r["list_size"] for r in rows if r["loss"] == "all_pairs"} == {4, 8}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows)
    assert "bradley_terry" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["floors"]["n"] == 1000
    # The fractions are taken against the better of the two bandwidth readings, sampled at the start, before each
    # of the three cases (bradley_terry, all_pairs K=4 and K=8) and at the end.
    assert result["roofline_bytes_per_s"] == max(result["in_place_bandwidth_bytes_per_s"],
                                                 result["fresh_output_bandwidth_bytes_per_s"])
    module = bench.benchmark_module("losses")
    assert result["roofline_calls"] == 2 * module.ROOFLINE_CALLS[0] + 3 * module.ROOFLINE_CALLS[1]
    assert result["in_place_best_bandwidth_bytes_per_s"] >= result["in_place_bandwidth_bytes_per_s"]
    ours = next(r for r in rows if r["loss"] == "bradley_terry" and r["mode"] == "fwd+bwd")
    assert ours["fraction_of_roofline"] == pytest.approx(ours["bytes_per_s"] / result["roofline_bytes_per_s"])


def test_roofline_is_the_median_of_its_samples_not_the_best_call():
    module = bench.benchmark_module("losses")
    meter = module.BandwidthMeter()
    meter.sample(3)
    assert len(meter.samples["in_place"]) == len(meter.samples["fresh_output"]) == 3
    assert all(rate > 0 for rate in meter.samples["in_place"] + meter.samples["fresh_output"])
    # A burst the host runs twice as fast does not move the reading.
    meter.samples = {"in_place": [50e9, 52e9, 54e9, 105e9, 101e9], "fresh_output": [30e9, 69e9, 35e9, 36e9, 34e9]}
    readings = meter.readings()
    assert readings == {"in_place": 54e9, "fresh_output": 35e9, "in_place_best": 105e9, "calls": 5}
    assert module.roofline(readings) == 54e9


def test_warmup_goes_on_while_calls_still_page_fault(monkeypatch):
    module = bench.benchmark_module("losses")
    faults = iter([0, 40, 40, 80, 80, 120, 120, 120, 120, 121] + [121] * 100)  # before / after each call
    monkeypatch.setattr(module, "_page_faults", lambda: next(faults))
    calls = []
    result = module.timings(lambda: calls.append(1), repeats=2)
    # Calls 1-3 fault 40 each (the minimum warm-up), the fourth none, then two timed calls.
    assert result["warmups"] == 4 and len(calls) == 6
    monkeypatch.setattr(module, "_page_faults", lambda: next(iter_always_faulting))
    iter_always_faulting = iter(range(0, 10**6, 100))
    calls.clear()
    assert module.timings(lambda: calls.append(1), repeats=1)["warmups"] == module.MAX_WARMUPS


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


def test_peers_summary_over_seeds():
    peers = bench.benchmark_module("peers")
    side = lambda pairs, tokens, wall, accuracy: {"steady_pairs_per_s": pairs, "steady_tokens_per_s": tokens,
                                                  "wall_seconds": wall, "heldout_accuracy": accuracy}
    runs = [{"seed": 0, "trl": side(4.0, 900, 250, 0.58), "jaxrm": side(10.0, 2700, 120, 0.57)},
            {"seed": 1, "trl": side(5.0, 1000, 300, 0.62), "jaxrm": side(11.0, 2000, 160, 0.59)},
            {"seed": 2, "trl": side(4.5, 950, 260, 0.60), "jaxrm": side(9.0, 2400, 140, 0.61)}]
    summary = peers.summarize(runs, heldout_pairs=500)
    # Speeds: medians per side; ratios: medians of the per-seed ratios (2.5, 2.2, 2.0 → 2.2 for pairs/s).
    assert summary["trl"]["steady_pairs_per_s"] == 4.5 and summary["jaxrm"]["wall_seconds"] == 140
    np.testing.assert_allclose(summary["ratios"]["steady_pairs_per_s"], 2.2)
    np.testing.assert_allclose(summary["ratios"]["steady_tokens_per_s"], 2400 / 950)
    np.testing.assert_allclose(summary["ratios"]["whole_process"], 300 / 160)  # of 2.08, 1.875, 1.86
    # Accuracy: difference of the means, standard error from the spread over seeds (sample variances / 3).
    np.testing.assert_allclose(summary["ratios"]["accuracy_difference"], 0.59 - 0.60)
    np.testing.assert_allclose(summary["accuracy_difference_standard_error"], ((0.0004 + 0.0004) / 3) ** 0.5)
    assert summary["floors"] == {"steady_state_2.5x": False, "whole_process_2x": False, "accuracy": True}
    table = peers.markdown({"steps": 60, "settings": {"batch_size": 16, "max_length": 256}, "seeds": [0, 1, 2],
                            "counts": {"heldout": {"kept": 500}}, "loadavg": {}, "runs": runs, **summary})
    assert "| 1 | trl | 5.00 | 1000 | 300 | 0.6200 |" in table and "**2.20×**" in table and "**-0.0100** ± 0.0163" in table
    # One seed: the binomial errors of the two accuracies.
    single = peers.summarize(runs[:1], heldout_pairs=500)
    np.testing.assert_allclose(single["accuracy_difference_standard_error"],
                               ((0.58 * 0.42 + 0.57 * 0.43) / 500) ** 0.5)


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


def test_peers_trl_precision_follows_the_auto_rule():
    from jaxrm.models.layers import auto_compute_dtype

    peers = bench.benchmark_module("peers")
    assert peers.trl_bf16("on") and not peers.trl_bf16("off")
    assert peers.trl_bf16("auto") == (auto_compute_dtype("cpu") == "bfloat16")
