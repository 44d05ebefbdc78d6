"""The evaluation report: buckets, separation, calibration, subsets/sections, length bias, plots."""

import numpy as np
import pytest

from jaxrm.calibration import expected_calibration_error, reliability_bins
from jaxrm.data.stats import spearman
from jaxrm.data.tokenize import TokenizedExample
from jaxrm.evaluate import margin_buckets, ordered_pairs, preference_metrics, write_evaluation_plots


def example(lengths, *, ranks=(0, 1), rating=-1, subset=None, margin=0.0, true_rewards=None):
    return TokenizedExample(
        sequences=tuple(np.arange(length + 2, dtype=np.int32) for length in lengths),
        ranks=np.asarray(ranks, np.int32), outcome=1, margin=margin, rating=rating,
        true_rewards=None if true_rewards is None else np.asarray(true_rewards, np.float32), source="t",
        truncated=False, subset=subset, response_lengths=np.asarray(lengths, np.int32),
    )


def naive_ece(gaps, bins):
    confidence = 1.0 / (1.0 + np.exp(-np.abs(gaps)))
    correct = gaps > 0
    total = 0.0
    for b in range(bins):
        low, high = 0.5 + 0.5 * b / bins, 0.5 + 0.5 * (b + 1) / bins
        inside = (confidence >= low) & ((confidence < high) if b < bins - 1 else (confidence <= high))
        if inside.any():
            total += inside.sum() / len(gaps) * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_ece_matches_a_naive_reference():
    gaps = np.random.default_rng(0).normal(0.5, 2.0, size=500)
    for bins in (1, 5, 10):
        assert expected_calibration_error(gaps, bins=bins) == pytest.approx(naive_ece(gaps, bins), abs=1e-12)
    assert reliability_bins(gaps, bins=10)["count"].sum() == 500
    assert np.isfinite(expected_calibration_error(np.array([1e4, -1e4, 0.0])))


def test_bradley_terry_labels_are_calibrated_and_inflated_gaps_are_not():
    rng = np.random.default_rng(1)
    true_gap = rng.normal(0.0, 2.0, size=40_000)
    chosen_first = rng.random(40_000) < 1.0 / (1.0 + np.exp(-true_gap))
    gaps = np.where(chosen_first, true_gap, -true_gap)  # r_w − r_l of the labelled pair
    assert expected_calibration_error(gaps) < 0.01
    assert expected_calibration_error(3.0 * gaps) > 0.05


def test_ordered_pairs_of_rankings_and_ties():
    examples = [example([3, 5, 4], ranks=(1, 0, 2)), example([2, 2], ranks=(0, 0))]
    rewards = np.array([[1.0, 2.0, 0.5], [3.0, 3.0, np.nan]], np.float32)
    pairs = ordered_pairs(rewards, examples)
    assert sorted(zip(pairs["better"].tolist(), pairs["worse"].tolist())) == [(0, 2), (1, 0), (1, 2)]
    assert set(pairs["example"].tolist()) == {0}
    np.testing.assert_allclose(sorted(pairs["gap"]), [0.5, 1.0, 1.5])


def test_margin_buckets_are_quartiles():
    index, labels = margin_buckets(np.arange(8, dtype=float))
    assert index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert labels[0] == "[0.00, 1.75)" and labels[-1] == "[5.25, 7.00]"


def test_preference_metrics_report():
    rng = np.random.default_rng(2)
    examples, rewards = [], []
    # 12 pairs in "hep-go" (reasoning), 4 in "mt-bench-hard" (chat_hard), 4 in "alpacaeval-easy" (chat)
    subsets = ["hep-go"] * 12 + ["mt-bench-hard"] * 4 + ["alpacaeval-easy"] * 4
    for i, subset in enumerate(subsets):
        lengths = (5, 3) if i % 2 else (3, 5)
        examples.append(example(lengths, rating=i % 4, subset=subset, margin=float(i % 4),
                                true_rewards=(1.0 + i, float(i))))
        gap = [2.0, -0.5, 0.5, 1.5][i % 4]
        base = rng.normal()
        rewards.append([base + gap, base])
    rewards = np.array(rewards, np.float32)
    metrics = preference_metrics(rewards, examples)
    gaps = rewards[:, 0] - rewards[:, 1]
    assert metrics["n_pairs"] == 20
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["accuracy_by_rating"] == {"negligibly better": 1.0, "slightly better": 0.0, "better": 1.0,
                                             "significantly better": 1.0}
    assert list(metrics["accuracy_by_margin"].values()) == [1.0, 0.0, 1.0, 1.0]
    assert metrics["share_gap_above_1"] == pytest.approx(0.5)
    assert metrics["mean_margin"] == pytest.approx(gaps.mean(), rel=1e-5)
    assert metrics["ece"] == pytest.approx(naive_ece(gaps.astype(np.float64), 10), abs=1e-6)
    assert metrics["chosen_reward"]["mean"] == pytest.approx(rewards[:, 0].mean(), rel=1e-5)
    assert metrics["rejected_reward"]["p50"] == pytest.approx(np.median(rewards[:, 1]), rel=1e-5)
    # chosen is longer on odd i, whose gaps are -0.5 and 1.5
    assert metrics["accuracy_chosen_longer"] == pytest.approx(0.5)
    assert metrics["accuracy_chosen_shorter"] == pytest.approx(1.0)
    assert metrics["n_chosen_longer"] == metrics["n_chosen_shorter"] == 10
    lengths = np.array([e.response_lengths for e in examples]).ravel()
    assert metrics["length_spearman"] == pytest.approx(spearman(rewards.ravel(), lengths))
    by_subset = {name: np.mean(gaps[[s == name for s in subsets]] > 0) for name in set(subsets)}
    assert metrics["accuracy_by_subset"] == pytest.approx(by_subset)
    assert metrics["accuracy_by_section"] == pytest.approx(
        {"reasoning": by_subset["hep-go"], "chat_hard": by_subset["mt-bench-hard"], "chat": by_subset["alpacaeval-easy"]})
    custom = preference_metrics(rewards, examples, sections={"all": ["hep-go", "mt-bench-hard"]})
    weighted = (12 * by_subset["hep-go"] + 4 * by_subset["mt-bench-hard"]) / 16
    assert custom["accuracy_by_section"] == pytest.approx({"all": weighted})
    assert "spearman_true_reward" in metrics


def test_no_subsets_no_margins_no_extra_keys():
    examples = [example((3, 4)) for _ in range(4)]
    metrics = preference_metrics(np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]], np.float32), examples)
    assert not {"accuracy_by_subset", "accuracy_by_margin", "accuracy_by_rating"} & set(metrics)
    assert metrics["accuracy"] == 0.5


def test_plots_are_written_only_where_asked(tmp_path):
    examples = [example((3, 4)) for _ in range(30)]
    rewards = np.random.default_rng(3).normal(size=(30, 2)).astype(np.float32)
    written = write_evaluation_plots(rewards, examples, tmp_path / "plots")
    assert sorted(path.name for path in written) == ["reliability.png", "rewards.png"]
    assert all(path.stat().st_size > 1000 for path in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]
