"""Scoring examples with a reward model and the metrics of a held-out preference set.

:func:`score_examples` runs the model over every example exactly once (length-sorted batches, the
last one padded with masked examples) and returns a reward per response. :func:`preference_metrics`
turns rewards into the report: loss, accuracy (ties count as wrong), mean margin r_w − r_l, reward
mean/std, accuracy per annotator-rating bucket, and — where the data knows the true reward (the
synthetic source) — the Spearman agreement between learned and true rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxrm.data.batching import Batch, Collator, sequential_batches
from jaxrm.data.records import RATING_LEVELS
from jaxrm.data.stats import spearman
from jaxrm.data.tokenize import TokenizedExample
from jaxrm.train.config import LossConfig
from jaxrm.train.mesh import global_batch
from jaxrm.train.step import example_losses, pair_statistics


def score_examples(reward_step: Callable, params, examples: Sequence[TokenizedExample], *, batch_size: int,
                   buckets: Sequence[int], pad_id: int, mesh) -> np.ndarray:
    """Rewards ``[N, K]`` (float32; NaN in the empty slots of lists shorter than K)."""
    collator = Collator(examples, buckets=buckets, pad_id=pad_id,
                        process_index=jax.process_index(), process_count=jax.process_count())
    rewards = np.full((len(examples), collator.list_size), np.nan, np.float32)
    for indices in sequential_batches(collator.lengths, batch_size):
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
        input_ids=np.zeros((num, list_size, 1), np.int32),
        attention_mask=np.ones((num, list_size, 1), np.int32),
        ranks=ranks,
        slot_mask=slot_mask,
        outcome=np.array([example.outcome for example in examples], np.int32),
        margin=np.array([example.margin for example in examples], np.float32),
        rating=np.array([example.rating for example in examples], np.int32),
        example_mask=np.ones((num,), bool),
    )


def preference_metrics(rewards: np.ndarray, examples: Sequence[TokenizedExample],
                       loss_config: LossConfig | None = None) -> dict:
    """The evaluation report of ``rewards`` (``[N, K]``, from :func:`score_examples`)."""
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
        metrics["loss"] = float(np.mean(np.asarray(example_losses(filled, batch, loss_config))))
    if np.any(batch.rating >= 0):
        by_rating = {}
        for level, name in enumerate(RATING_LEVELS):
            in_level = batch.rating == level
            if in_level.any():
                level_stats = pair_statistics(filled, batch.ranks, batch.slot_mask, in_level)
                by_rating[name] = float(level_stats["correct"]) / max(float(level_stats["pairs"]), 1.0)
        metrics["accuracy_by_rating"] = by_rating
    if all(example.true_rewards is not None for example in examples):
        true = np.stack([np.asarray(example.true_rewards, np.float32) for example in examples])
        metrics["spearman_true_reward"] = float(spearman(filled[batch.slot_mask], true[batch.slot_mask]))
    return metrics
