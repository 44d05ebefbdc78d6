"""Scoring examples with a reward model and the metrics of a held-out preference set.

:func:`score_examples` runs the model over every example exactly once (length-sorted batches, the
last one padded with masked examples) and returns a reward per response. :func:`preference_metrics`
turns rewards into the report. Over every ordered pair (w better than l) of every record, with
Δ = r_w − r_l:

* ``accuracy`` (Δ = 0 counts as wrong), ``mean_margin`` (mean Δ), ``loss`` (with a loss config);
* per bucket, Llama 2 Table 28 style: ``accuracy_by_rating`` (annotator rating), and
  ``accuracy_by_margin`` (quartiles of the data's margins, when it has margins);
* separation: ``share_gap_above_1`` (pairs with Δ > 1: the model's own σ(Δ) > 0.73);
* calibration: ``ece`` of σ(Δ) (:mod:`jaxrm.calibration`);
* ``chosen_reward`` / ``rejected_reward``: mean, std and 10/50/90 % quantiles;
* ``accuracy_by_subset`` with a ``subset`` column, and ``accuracy_by_section`` for subsets that belong
  to a section (RewardBench's by default): a section's score is the mean of its subsets' accuracies
  weighted by their sizes, i.e. the accuracy over all of its pairs;
* length bias: ``length_spearman`` (Spearman between reward and response length in tokens, over all
  responses) and accuracy when the chosen response is the longer / the shorter one;
* ``spearman_true_reward`` where the data knows the true reward (the synthetic source).

:func:`write_evaluation_plots` draws the reliability diagram and the reward distributions.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from jaxrm.calibration import expected_calibration_error, plot_reliability
from jaxrm.data.batching import SEQUENCES_PER_ROW, Batch, Collator, sequential_batches
from jaxrm.data.records import RATING_LEVELS
from jaxrm.data.stats import spearman
from jaxrm.data.tokenize import TokenizedExample
from jaxrm.train.config import LossConfig
from jaxrm.train.mesh import global_batch
from jaxrm.train.step import example_losses, pair_statistics


def score_examples(reward_step: Callable, params, examples: Sequence[TokenizedExample], *, batch_size: int,
                   buckets: Sequence[int], pad_id: int, mesh, sequences_per_row: int = SEQUENCES_PER_ROW) -> np.ndarray:
    """Rewards ``[N, K]`` (float32; NaN in the empty slots of lists shorter than K)."""
    collator = Collator(examples, buckets=buckets, pad_id=pad_id, sequences_per_row=sequences_per_row,
                        row_shards=mesh.shape["data"] * mesh.shape["fsdp"],
                        process_index=jax.process_index(), process_count=jax.process_count())
    rewards = np.full((len(examples), collator.list_size), np.nan, np.float32)
    tokens = collator.tokens if sequences_per_row > 1 else None
    for indices in sequential_batches(collator.lengths, batch_size, tokens=tokens):
        batch_rewards = np.asarray(jax.device_get(reward_step(params, global_batch(collator(indices), mesh))))
        real = indices >= 0
        rewards[indices[real]] = batch_rewards[real]
    for i, example in enumerate(examples):
        rewards[i, len(example.sequences):] = np.nan
    return rewards


def _host_batch(examples: Sequence[TokenizedExample], list_size: int) -> Batch:
    """The label fields of a batch (no tokens) for computing losses on host-side rewards."""
    num = len(examples)
    ranks = np.zeros((num, list_size), np.int32)
    slot_mask = np.zeros((num, list_size), bool)
    for row, example in enumerate(examples):
        ranks[row, : len(example.ranks)] = example.ranks
        slot_mask[row, : len(example.ranks)] = True
    return Batch(
        input_ids=np.zeros((1, 1), np.int32),
        segment_ids=np.ones((1, 1), np.int32),
        sequence_index=np.zeros((num, list_size), np.int32),
        ranks=ranks,
        slot_mask=slot_mask,
        outcome=np.array([example.outcome for example in examples], np.int32),
        margin=np.array([example.margin for example in examples], np.float32),
        rating=np.array([example.rating for example in examples], np.int32),
        example_mask=np.ones((num,), bool),
    )


#: RewardBench's sections and their subsets (Lambert et al. 2024, arXiv:2403.13787).
REWARDBENCH_SECTIONS = {
    "chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "chat_hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}


def ordered_pairs(rewards: np.ndarray, examples: Sequence[TokenizedExample]) -> dict:
    """Every ordered pair (w better than l) of every record, as flat arrays.

    Keys: ``example`` (record index), ``better``/``worse`` (slots), ``gap`` (r_w − r_l),
    ``chosen``/``rejected`` (rewards), ``chosen_length``/``rejected_length`` (response tokens).
    Ties (equal ranks) give no pair.
    """
    columns = {key: [] for key in ("example", "better", "worse")}
    for index, example in enumerate(examples):
        ranks = np.asarray(example.ranks)
        better, worse = np.nonzero(ranks[:, None] < ranks[None, :])
        columns["example"].append(np.full(len(better), index))
        columns["better"].append(better)
        columns["worse"].append(worse)
    pairs = {key: np.concatenate(value).astype(np.int64) if value else np.zeros(0, np.int64)
             for key, value in columns.items()}
    rows = pairs["example"]
    pairs["chosen"] = rewards[rows, pairs["better"]].astype(np.float64)
    pairs["rejected"] = rewards[rows, pairs["worse"]].astype(np.float64)
    pairs["gap"] = pairs["chosen"] - pairs["rejected"]
    lengths = [np.asarray(example.response_lengths) for example in examples]
    pairs["chosen_length"] = np.array([lengths[r][b] for r, b in zip(rows, pairs["better"])], np.int64)
    pairs["rejected_length"] = np.array([lengths[r][w] for r, w in zip(rows, pairs["worse"])], np.int64)
    return pairs


def _accuracy(gaps: np.ndarray) -> float:
    return float(np.mean(gaps > 0)) if len(gaps) else float("nan")


def _distribution(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    p10, p50, p90 = np.quantile(values, [0.1, 0.5, 0.9])
    return {"mean": float(values.mean()), "std": float(values.std()), "p10": float(p10), "p50": float(p50),
            "p90": float(p90)}


def margin_buckets(margins: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Quartile buckets of margins: ``(bucket index per margin, labels like "[0.33, 0.67)")``."""
    edges = np.unique(np.quantile(margins, [0.25, 0.5, 0.75]))
    index = np.searchsorted(edges, margins, side="right")
    bounds = [float(margins.min()), *edges.tolist(), float(margins.max())]
    labels = [f"[{bounds[i]:.2f}, {bounds[i + 1]:.2f}{']' if i == len(edges) else ')'}" for i in range(len(edges) + 1)]
    return index, labels


def preference_metrics(rewards: np.ndarray, examples: Sequence[TokenizedExample],
                       loss_config: LossConfig | None = None, *,
                       sections: Mapping[str, Sequence[str]] | None = None, calibration_bins: int = 10) -> dict:
    """The evaluation report of ``rewards`` (``[N, K]``, from :func:`score_examples`); see the module docstring.

    ``sections`` maps a section name to its subsets (default :data:`REWARDBENCH_SECTIONS`); a section
    is reported when the data has at least one of its subsets.
    """
    batch = _host_batch(examples, rewards.shape[1])
    filled = np.where(batch.slot_mask, rewards, 0.0).astype(np.float32)
    stats = {key: float(value) for key, value in
             pair_statistics(filled, batch.ranks, batch.slot_mask, batch.example_mask).items()}
    real = filled[batch.slot_mask]
    metrics = {
        "n_examples": len(examples),
        "n_pairs": int(stats["pairs"]),
        "accuracy": stats["correct"] / max(stats["pairs"], 1.0),
        "mean_margin": stats["gap"] / max(stats["pairs"], 1.0),
        "reward_mean": float(real.mean()),
        "reward_std": float(real.std()),
    }
    if loss_config is not None:
        # The plain loss of the run's loss family: training-time margins are a training device, and
        # the data's own margins are reported through ``accuracy_by_margin`` instead.
        unmargined = dataclasses.replace(batch, margin=np.zeros_like(batch.margin))
        metrics["loss"] = float(np.mean(np.asarray(example_losses(filled, unmargined, loss_config))))
    pairs = ordered_pairs(filled, examples)
    gaps = pairs["gap"]
    if np.any(batch.rating >= 0):
        pair_rating = batch.rating[pairs["example"]]
        metrics["accuracy_by_rating"] = {name: _accuracy(gaps[pair_rating == level])
                                         for level, name in enumerate(RATING_LEVELS) if np.any(pair_rating == level)}
    if len(gaps):
        pair_margin = batch.margin[pairs["example"]].astype(np.float64)
        if np.ptp(pair_margin) > 0:
            bucket, labels = margin_buckets(pair_margin)
            metrics["accuracy_by_margin"] = {label: _accuracy(gaps[bucket == i]) for i, label in enumerate(labels)
                                             if np.any(bucket == i)}
        metrics["share_gap_above_1"] = float(np.mean(gaps > 1.0))
        metrics["ece"] = expected_calibration_error(gaps, bins=calibration_bins)
        metrics["chosen_reward"] = _distribution(pairs["chosen"])
        metrics["rejected_reward"] = _distribution(pairs["rejected"])
        metrics.update(_length_bias(filled, batch.slot_mask, examples, pairs))
        metrics.update(_subset_accuracy(examples, pairs, REWARDBENCH_SECTIONS if sections is None else sections))
    if all(example.true_rewards is not None for example in examples):
        true = np.stack([np.asarray(example.true_rewards, np.float32) for example in examples])
        metrics["spearman_true_reward"] = float(spearman(filled[batch.slot_mask], true[batch.slot_mask]))
    return metrics


def _length_bias(filled, slot_mask, examples, pairs) -> dict:
    lengths = np.zeros(slot_mask.shape, np.int64)
    for row, example in enumerate(examples):
        lengths[row, : len(example.response_lengths)] = example.response_lengths
    rewards, lengths = filled[slot_mask], lengths[slot_mask]
    longer = pairs["chosen_length"] > pairs["rejected_length"]
    shorter = pairs["chosen_length"] < pairs["rejected_length"]
    return {
        "length_spearman": float(spearman(rewards, lengths)) if np.ptp(lengths) > 0 else float("nan"),
        "accuracy_chosen_longer": _accuracy(pairs["gap"][longer]),
        "accuracy_chosen_shorter": _accuracy(pairs["gap"][shorter]),
        "n_chosen_longer": int(longer.sum()),
        "n_chosen_shorter": int(shorter.sum()),
    }


def _subset_accuracy(examples, pairs, sections: Mapping[str, Sequence[str]]) -> dict:
    subsets = np.array([example.subset or "" for example in examples], dtype=object)[pairs["example"]]
    if not np.any(subsets != ""):
        return {}
    gaps = pairs["gap"]
    by_subset = {name: _accuracy(gaps[subsets == name]) for name in sorted(set(subsets) - {""})}
    by_section = {}
    for section, members in sections.items():
        in_section = np.isin(subsets, list(members))
        if in_section.any():
            # The mean of its subsets' accuracies weighted by their pair counts = accuracy over its pairs.
            by_section[section] = _accuracy(gaps[in_section])
    result = {"accuracy_by_subset": by_subset}
    if by_section:
        result["accuracy_by_section"] = by_section
    return result


def write_evaluation_plots(rewards: np.ndarray, examples: Sequence[TokenizedExample], out_dir: str | Path, *,
                           title: str = "held-out", calibration_bins: int = 10) -> list[Path]:
    """Writes ``reliability.png`` and ``rewards.png`` (chosen vs rejected) into ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = ordered_pairs(np.nan_to_num(rewards), examples)
    written = [plot_reliability(pairs["gap"], out_dir / "reliability.png", bins=calibration_bins, title=title)]
    figure, axis = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.concatenate([pairs["chosen"], pairs["rejected"]]), bins=40)
    axis.hist(pairs["chosen"], bins=bins, alpha=0.6, label="chosen")
    axis.hist(pairs["rejected"], bins=bins, alpha=0.6, label="rejected")
    axis.set_xlabel("reward")
    axis.set_ylabel("count")
    axis.set_title(f"{title}: chosen vs rejected rewards")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "rewards.png", dpi=100)
    plt.close(figure)
    written.append(out_dir / "rewards.png")
    return written
