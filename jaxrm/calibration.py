"""Is σ(r_w − r_l) a probability? Expected calibration error and the reliability diagram.

A Bradley–Terry reward model predicts that the first of two responses wins with probability
σ(r₁ − r₂). On a preference pair the label is always "chosen wins", so calibration is measured the
way a binary classifier's is (Guo et al. 2017, arXiv:1706.04599): the model predicts the winner of
each pair (the response with the higher reward), with confidence c = σ(|Δ|) ∈ [0.5, 1], and is right
when Δ = r_w − r_l > 0. The pairs are binned by confidence into equal-width bins over [0.5, 1], and

.. math::
    \\mathrm{ECE} = \\sum_{b} \\frac{n_b}{N}\\,\\big|\\operatorname{acc}_b - \\operatorname{conf}_b\\big|.

A pair with Δ = 0 has confidence 0.5 and counts as wrong (as in accuracy). Perfect calibration (0)
means that of the pairs the model calls at 80 %, 80 % go its way — what the synthetic source's
Bradley–Terry labels give a model that learned the true reward exactly.

Example:
    >>> import numpy as np
    >>> round(expected_calibration_error(np.array([3.0, 3.0, -3.0, 3.0])), 3)
    0.203
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def reliability_bins(gaps: np.ndarray, *, bins: int = 10) -> dict:
    """Per confidence bin: ``edges`` ``[bins+1]``, ``confidence`` and ``accuracy`` (NaN when empty), ``count``."""
    gaps = np.asarray(gaps, np.float64).ravel()
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if not np.all(np.isfinite(gaps)):
        raise ValueError("calibration needs finite reward gaps; got NaN or infinity")
    confidence = 0.5 + 0.5 * np.tanh(0.5 * np.abs(gaps))  # σ(|Δ|) without overflow
    correct = gaps > 0
    edges = np.linspace(0.5, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return {"edges": edges, "confidence": mean_confidence, "accuracy": accuracy, "count": count}


def expected_calibration_error(gaps: np.ndarray, *, bins: int = 10) -> float:
    """ECE of the predicted winner of each pair (see the module docstring); NaN with no pairs."""
    table = reliability_bins(gaps, bins=bins)
    total = table["count"].sum()
    if total == 0:
        return float("nan")
    filled = table["count"] > 0
    weights = table["count"][filled] / total
    return float(np.sum(weights * np.abs(table["accuracy"][filled] - table["confidence"][filled])))


def plot_reliability(gaps: np.ndarray, path: str | Path, *, bins: int = 10, title: str = "reliability") -> Path:
    """Writes the reliability diagram (accuracy against confidence per bin, and the bin counts) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = reliability_bins(gaps, bins=bins)
    edges, filled = table["edges"], table["count"] > 0
    centers = 0.5 * (edges[:-1] + edges[1:])
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0.5, 1.0], [0.5, 1.0], color="gray", linestyle="--", label="calibrated")
    top.bar(centers[filled], table["accuracy"][filled], width=np.diff(edges)[filled], alpha=0.6,
            edgecolor="black", label="accuracy")
    top.plot(table["confidence"][filled], table["accuracy"][filled], marker="o", color="C1", label="(conf, acc)")
    top.set_ylabel("accuracy")
    top.set_ylim(0.0, 1.0)
    top.set_title(f"{title}: ECE {expected_calibration_error(gaps, bins=bins):.3f}")
    top.legend(loc="upper left")
    bottom.bar(centers, table["count"], width=np.diff(edges), color="C0", edgecolor="black")
    bottom.set_xlabel("confidence σ(|r_w − r_l|)")
    bottom.set_ylabel("pairs")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
