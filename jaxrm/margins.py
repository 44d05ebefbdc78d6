"""Margins for the pairwise losses: where the m in −log σ(r_w − r_l − m) comes from.

A margin asks the reward model to separate a pair by at least m before the loss lets go, so strongly
preferred pairs end up further apart than barely preferred ones (Touvron et al. 2023, §3.2.2; Qin,
Feng, Yang 2024, arXiv:2404.04932).

Sources:
  * ``data``: the record's own ``margin`` field (validated finite and ≥ 0 when read).
  * ``rating``: an annotator rating mapped through a table, weakest level first, indexed like
    :data:`jaxrm.data.records.RATING_LEVELS`. Llama 2's two maps (Table 27):

    ======================  =====  =====
    rating                  small  large
    ======================  =====  =====
    negligibly better/unsure  0      0
    slightly better          1/3     1
    better                   2/3     2
    significantly better      1      3
    ======================  =====  =====
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
    """The margin of every example (float32 ``[N]``) for the margin ``source``.

    ``none`` → zeros; ``data`` → each example's own margin; ``rating`` → the rating through
    :func:`rating_margin_table`. An example without a rating under ``rating`` is an error naming it.
    """
    if source == "none":
        return np.zeros(len(examples), np.float32)
    if source == "data":
        return scale * np.array([example.margin for example in examples], np.float32)
    if source == "rating":
        table = rating_margin_table(rating_margins)
        missing = [example.source for example in examples if example.rating < 0]
        if missing:
            raise ValueError(
                f"loss.margin=rating but {len(missing)} records have no rating (first: {missing[0]}); "
                "add a rating to every record or use loss.margin=data/none"
            )
        return scale * table[np.array([example.rating for example in examples])]
    raise ValueError(f"unknown margin source {source!r}; use none, data or rating")
