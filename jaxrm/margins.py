"""Margins for the pairwise losses: where the m in −log σ(r_w − r_l − m) comes from.

A margin asks the reward model to separate a pair by at least m before the loss lets go, so strongly
preferred pairs end up further apart than barely preferred ones (Touvron et al. 2023, §3.2.2; Qin,
Feng, Yang 2024, arXiv:2404.04932). ``loss.margin`` picks the source:

* ``none``: m = 0, plain ranking.
* ``data``: the record's own ``margin`` field (e.g. written by ``jaxrm margins estimate``), times
  ``loss.margin_scale``.
* ``rating``: an annotator rating mapped through a table, weakest level first, indexed like
  :data:`jaxrm.data.records.RATING_LEVELS`, times ``loss.margin_scale``. Llama 2's two maps (Table 27):

    ========================  =====  =====
    rating                    small  large
    ========================  =====  =====
    negligibly better/unsure    0      0
    slightly better            1/3     1
    better                     2/3     2
    significantly better        1      3
    ========================  =====  =====

* ``score_gap``: m = ``margin_scale`` · (score_w − score_l) for records with per-response scores
  (pairwise ``score_chosen``/``score_rejected``, or a ranked pair's ``scores``).
* ``confidence``: no label at all; the train step computes m from the current model's own detached
  reward gap (:func:`confidence_margins`).

Without labels there is also the reference margin: ``jaxrm margins estimate`` scores every pair with
one trained model or an ensemble and writes m = clip(scale · mean gap, 0, max) into the data
(:func:`reference_margins`), for a second run with ``loss.margin=data``.

Every margin that reaches training is finite and ≥ 0; anything else fails naming the record.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.data.records import DataError

#: The values of ``loss.margin``.
MARGIN_SOURCES = ("none", "data", "rating", "score_gap", "confidence")

LLAMA2_RATING_MARGINS = {
    "small": (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0),
    "large": (0.0, 1.0, 2.0, 3.0),
}


def rating_margin_table(rating_margins: str | Sequence[float]) -> np.ndarray:
    """The margin per rating level (weakest first): a Llama 2 map by name, or 4 numbers ≥ 0."""
    if isinstance(rating_margins, str):
        if rating_margins not in LLAMA2_RATING_MARGINS:
            raise ValueError(f"unknown rating margin map {rating_margins!r}; use one of {sorted(LLAMA2_RATING_MARGINS)}")
        return np.asarray(LLAMA2_RATING_MARGINS[rating_margins], np.float32)
    table = np.asarray(rating_margins, np.float32)
    if table.shape != (4,) or not np.all(np.isfinite(table)) or np.any(table < 0):
        raise ValueError(f"a rating margin map needs 4 finite margins ≥ 0, weakest level first; got {list(rating_margins)}")
    return table


def example_margins(examples, source: str, *, scale: float = 1.0, rating_margins="small") -> np.ndarray:
    """The host-side margin of every example (float32 ``[N]``) for the margin ``source``.

    ``none`` and ``confidence`` → zeros (the confidence margin is computed in the train step);
    ``data`` → each example's own margin; ``rating`` → the rating through :func:`rating_margin_table`;
    ``score_gap`` → the score of the preferred response minus the other's. All are times ``scale``.

    Raises:
      DataError: an example lacks what the source needs (a rating, two scores), or its margin is NaN,
        infinite or negative; the message starts with the record's ``file:line``.
    """
    if source not in MARGIN_SOURCES:
        raise ValueError(f"unknown margin source {source!r}; use one of {', '.join(MARGIN_SOURCES)}")
    if not np.isfinite(scale) or scale < 0:
        raise ValueError(f"loss.margin_scale must be a finite number >= 0, got {scale}")
    if source in ("none", "confidence"):
        return np.zeros(len(examples), np.float32)
    if source == "data":
        raw = np.array([example.margin for example in examples], np.float64)
    elif source == "rating":
        table = rating_margin_table(rating_margins)
        for example in examples:
            if example.rating < 0:
                raise DataError(f"{example.source}: loss.margin=rating but the record has no 'rating'; add a rating "
                                "to every record or use loss.margin=data/none")
        raw = table[np.array([example.rating for example in examples], np.int64)].astype(np.float64)
    else:
        raw = np.array([_score_gap(example) for example in examples], np.float64)
    margins = scale * raw
    check_margins(margins, [example.source for example in examples], what=f"loss.margin={source}")
    return margins.astype(np.float32)


def _score_gap(example) -> float:
    if example.scores is None:
        raise DataError(f"{example.source}: loss.margin=score_gap but the record has no per-response scores; give "
                        "'score_chosen' and 'score_rejected' (pairs) or 'scores' (ranked pairs)")
    if len(example.scores) != 2:
        raise DataError(f"{example.source}: loss.margin=score_gap needs pairs, but the record has "
                        f"{len(example.scores)} responses")
    better = int(np.argmin(example.ranks))
    return float(example.scores[better] - example.scores[1 - better])


def check_margins(margins: np.ndarray, sources: Sequence[str], *, what: str = "margin") -> None:
    """Raises :class:`DataError` naming the first record whose margin is NaN, infinite or negative."""
    margins = np.asarray(margins, np.float64)
    bad = ~np.isfinite(margins) | (margins < 0)
    if np.any(bad):
        first = int(np.argmax(bad))
        raise DataError(
            f"{sources[first]}: {what} gives margin {margins[first]} ({int(bad.sum())} record(s) like it); a margin "
            "must be a finite number >= 0 (a negative one means chosen scored below rejected: fix or drop the record)"
        )


def confidence_margins(chosen: jax.Array, rejected: jax.Array, step: jax.Array, *, scale: float = 1.0,
                       warmup_steps: int = 0) -> jax.Array:
    """The online reward-confidence margin of each pair, from the current model's detached rewards.

    .. math::
        m_b = s \\cdot w(t) \\cdot \\max\\big(0,\\; 2\\,\\sigma(\\operatorname{sg}(r_w - r_l)) - 1\\big)
            = s \\cdot w(t) \\cdot \\max\\big(0, \\tanh(\\operatorname{sg}(r_w - r_l) / 2)\\big),
        \\qquad w(t) = \\min(1, t / T_{\\text{warm}})

    σ(Δ) is the model's own Bradley–Terry probability that the chosen response wins, so
    2σ(Δ) − 1 ∈ [−1, 1] is its confidence beyond chance; clipped at 0 it is a preference strength in
    [0, 1), the same range as Llama 2's "small" rating map (s = 3 matches "large"). A pair the model
    finds barely distinguishable gets m ≈ 0, one it is sure about gets m ≈ s: the rating-margin rule
    with the model's confidence in place of the annotator's rating (Qin, Feng, Yang 2024). sg (stop
    gradient) makes m a target, not a path: the loss cannot lower itself by moving the margin. The
    bound s keeps the margin from chasing a growing gap (m ∝ Δ would only rescale the rewards), and
    the warm-up w(t) holds it near 0 while an untrained model's gaps are noise.

    Args:
      chosen, rejected: rewards ``[B]`` of the batch (gradients are stopped here).
      step: the optimizer step t (``TrainState.step``, 0 before the first update).
      scale: s, the largest margin (``loss.margin_scale``).
      warmup_steps: T_warm (``loss.confidence_warmup_steps``); 0 = full margin from the start.

    Returns:
      float32 ``[B]`` margins in [0, s).

    Example:
        >>> import jax.numpy as jnp
        >>> m = confidence_margins(jnp.array([0.0, 2.0, -1.0]), jnp.zeros(3), jnp.array(5), warmup_steps=10)
        >>> [round(float(x), 3) for x in m]
        [0.0, 0.381, 0.0]
    """
    gap = jax.lax.stop_gradient(jnp.asarray(chosen, jnp.float32) - jnp.asarray(rejected, jnp.float32))
    ramp = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps) if warmup_steps > 0 else 1.0
    return scale * ramp * jnp.maximum(0.0, jnp.tanh(0.5 * gap))


def reference_margins(member_gaps: np.ndarray, *, scale: float = 1.0,
                      max_margin: float | None = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Margins from reference reward models: ``(clip(scale · mean gap, 0, max), std of the gaps)``.

    ``member_gaps`` is ``[M, N]``: r_w − r_l of each of the N pairs under each of the M models. The
    mean over the ensemble is the preference strength of Wang et al. 2024 (Secrets of RLHF II,
    arXiv:2401.06080); a pair the references think is swapped (mean gap < 0) gets margin 0, and its
    std says how much the references disagree (large std: an ambiguous or mislabelled pair). With one
    model the std is 0. ``max_margin=None`` leaves the top open.
    """
    if not (np.isfinite(scale) and scale >= 0) or (max_margin is not None and not max_margin >= 0):
        raise ValueError(f"need a finite scale >= 0 and max_margin >= 0 (or None), got {scale} and {max_margin}")
    member_gaps = np.asarray(member_gaps, np.float64)
    if member_gaps.ndim != 2 or member_gaps.shape[0] < 1:
        raise ValueError(f"member_gaps must be [models, pairs], got shape {member_gaps.shape}")
    if not np.all(np.isfinite(member_gaps)):
        raise ValueError("a reference model gave a non-finite reward; check the model (and its dtype)")
    margins = np.clip(scale * member_gaps.mean(axis=0), 0.0, np.inf if max_margin is None else max_margin)
    return margins, member_gaps.std(axis=0)
