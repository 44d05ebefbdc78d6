"""Rank statistics in plain NumPy (no SciPy): how well learned rewards order responses like true ones."""

from __future__ import annotations

import numpy as np

__all__ = ["rankdata", "spearman"]


def rankdata(values) -> np.ndarray:
    """1-based ranks of ``values`` (smallest = 1), tied values sharing their average rank.

    >>> rankdata([10, 30, 20, 20]).tolist()
    [1.0, 4.0, 2.5, 2.5]
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    # Every run of equal values gets the mean of the positions it spans.
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x, y) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks of ``x`` and ``y``.

    Returns NaN when it is undefined (fewer than 2 values, or one side constant).

    >>> spearman([1, 2, 3], [10, 20, 30]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs two sequences of the same length, got {x.shape[0]} and {y.shape[0]}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("spearman needs finite values; got NaN or infinity")
    if len(x) < 2:
        return float("nan")
    rank_x = rankdata(x) - (len(x) + 1) / 2
    rank_y = rankdata(y) - (len(y) + 1) / 2
    denominator = np.sqrt(np.sum(rank_x**2) * np.sum(rank_y**2))
    if denominator == 0:
        return float("nan")
    return float(np.clip(np.sum(rank_x * rank_y) / denominator, -1.0, 1.0))
