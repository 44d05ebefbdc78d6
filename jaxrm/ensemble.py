"""Reward-model ensembles: one reward from several models' rewards.

Each member's rewards are first centred (its mean over the scored responses subtracted): a
Bradley–Terry reward is defined only up to a constant, so without centring ``min`` would just pick
the member with the lowest offset and the variance would measure offsets, not disagreement. Gaps
r_w − r_l, and so accuracy under ``mean``, do not change. Then, over the M members (Coste et al.
2023, Reward Model Ensembles Help Mitigate Overoptimization, arXiv:2310.02743):

* ``mean``: :math:`\\bar r = \\frac1M\\sum_m r_m`;
* ``min`` (worst case): :math:`\\min_m r_m`;
* ``uncertainty`` (uncertainty-weighted optimisation): :math:`\\bar r - \\lambda\\,\\operatorname{Var}_m r_m`
  (population variance).

Example:
    >>> import numpy as np
    >>> members = np.array([[[1.0, 0.0]], [[3.0, 0.0]]])   # 2 models, 1 pair
    >>> combine_rewards(members, "mean").tolist(), combine_rewards(members, "min").tolist()
    ([[1.0, -1.0]], [[0.5, -1.5]])
"""

from __future__ import annotations

import numpy as np

ENSEMBLE_METHODS = ("mean", "min", "uncertainty")


def center_members(member_rewards: np.ndarray) -> np.ndarray:
    """``[M, N, K]`` rewards with each member's mean over its real (non-NaN) responses subtracted."""
    member_rewards = np.asarray(member_rewards, np.float64)
    return member_rewards - np.nanmean(member_rewards.reshape(len(member_rewards), -1), axis=1)[:, None, None]


def combine_rewards(member_rewards: np.ndarray, method: str = "mean", *, penalty: float = 1.0,
                    center: bool = True) -> np.ndarray:
    """One reward per response (``[N, K]``, float32) from M members' rewards ``[M, N, K]``.

    NaN (the empty slots of short lists) stays NaN. ``penalty`` is λ of ``uncertainty``.
    """
    if method not in ENSEMBLE_METHODS:
        raise ValueError(f"unknown ensemble method {method!r}; use one of {', '.join(ENSEMBLE_METHODS)}")
    member_rewards = np.asarray(member_rewards, np.float64)
    if member_rewards.ndim != 3 or len(member_rewards) < 1:
        raise ValueError(f"member_rewards must be [models, examples, responses], got shape {member_rewards.shape}")
    if not np.isfinite(penalty) or penalty < 0:
        raise ValueError(f"the uncertainty penalty must be a finite number >= 0, got {penalty}")
    rewards = center_members(member_rewards) if center else member_rewards
    if method == "mean":
        combined = rewards.mean(axis=0)
    elif method == "min":
        combined = rewards.min(axis=0)
    else:
        combined = rewards.mean(axis=0) - penalty * rewards.var(axis=0)
    return combined.astype(np.float32)


def member_disagreement(member_rewards: np.ndarray) -> np.ndarray:
    """The std over members of each (centred) reward, ``[N, K]``: 0 for a single model."""
    return center_members(member_rewards).std(axis=0).astype(np.float32)
