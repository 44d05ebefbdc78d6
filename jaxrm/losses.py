r"""Ranking losses for reward models, as pure JAX functions.

A reward model scores responses; human preferences say which response is better. Every loss here
turns scores into a per-example negative log-likelihood (or a surrogate of one) under a model of
how preferences arise:

- pairwise (chosen vs rejected): :func:`bradley_terry`, :func:`hinge`,
  :func:`smoothed_bradley_terry`, :func:`focal_bradley_terry`;
- pairs that may be ties: :func:`rao_kupper`, :func:`davidson`;
- rankings of K responses: :func:`all_pairs`, :func:`plackett_luce`;
- regularisers: :func:`centering`, :func:`l2`;
- reduction and metrics: :func:`masked_mean`, :func:`preference_probability`, :func:`accuracy`.

Conventions shared by every function:

- Rewards are float arrays of any shape (float16, bfloat16, float32, or float64 with x64 on).
  Anything else is a ``TypeError``: integer scores are almost always a bug upstream.
- Arrays that are paired must have *exactly* the same shape. Broadcasting is refused on purpose:
  ``[B]`` against ``[B, 1]`` would silently build a ``[B, B]`` matrix of every pair in the batch.
  Options such as ``margin`` are a scalar or exactly the rewards' shape. A wrong shape is a
  ``ValueError`` that names the shapes.
- Arithmetic is done in float32 at least, and results are float32, whatever the input float type.
- Results are per example (per pair, or per list); reduce them with :func:`masked_mean`.
  :func:`bradley_terry` also takes ``reduction="mean"`` or ``"sum"`` (as torch's losses do), which its
  C++ pass computes, with the gradient, without writing the per-pair losses at all.
- Everything is pure and works under ``jax.jit``, ``jax.grad``, ``jax.vmap``, ``jax.shard_map``
  and ``jax.pmap``.
- :func:`bradley_terry` on 16,384 pairs or more, float32, on one CPU device, takes its value (and,
  differentiated, its derivatives) from one C++ pass over the pairs (:mod:`jaxrm.kernels.pairwise`;
  1.3–2.3× as fast as XLA's code at 10⁷ pairs, by machine and pass, and with a reduction faster
  still): the same to a few float32 roundings, and differentiable to any order.

The names the training engine looks up in a config are in :data:`PAIRWISE_LOSSES`,
:data:`TIE_LOSSES` and :data:`LISTWISE_LOSSES`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxrm.kernels import pairwise

__all__ = [
    "LISTWISE_LOSSES",
    "PAIRWISE_LOSSES",
    "TIE_LOSSES",
    "accuracy",
    "all_pairs",
    "bradley_terry",
    "centering",
    "davidson",
    "focal_bradley_terry",
    "hinge",
    "l2",
    "masked_mean",
    "plackett_luce",
    "preference_probability",
    "rao_kupper",
    "smoothed_bradley_terry",
]


# --------------------------------------------------------------------------------------------
# Validation. Each public function checks its arguments here, then calls a jit-compiled private
# function that does the arithmetic. Shapes and dtypes are static, so the checks also run when the
# caller traces (under jit, grad, vmap); value checks (a positive log_theta, outcomes in {-1, 0, 1})
# run only on concrete values, since a traced value cannot be inspected.


def _rewards(name: str, value: ArrayLike) -> jax.Array:
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float16, bfloat16 or float32), got dtype "
            f"{array.dtype}. Integer or boolean scores are usually a bug upstream; if they are "
            f"meant, cast them first, e.g. {name}.astype(jnp.float32)."
        )
    return array


def _same_shape(first_name: str, first: jax.Array, name: str, array: jax.Array) -> None:
    if first.shape != array.shape:
        raise ValueError(
            f"{first_name} and {name} must have exactly the same shape, got {first_name} of shape "
            f"{first.shape} and {name} of shape {array.shape}. Broadcasting is refused on purpose "
            f"([B] against [B, 1] would silently build a [B, B] matrix); reshape one of them."
        )


def _pair(name_a: str, rewards_a: ArrayLike, name_b: str, rewards_b: ArrayLike) -> tuple[jax.Array, jax.Array]:
    a = _rewards(name_a, rewards_a)
    b = _rewards(name_b, rewards_b)
    _same_shape(name_a, a, name_b, b)
    return a, b


def _option(name: str, value: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    """A real-valued option (margin, gamma, …): a scalar or exactly ``shape``."""
    array = jnp.asarray(value)
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real number or array, got dtype {array.dtype}.")
    if array.shape not in ((), shape):
        raise ValueError(
            f"{name} must be a scalar or have exactly the rewards' shape {shape}, got shape "
            f"{array.shape}. Broadcasting is refused on purpose; reshape it."
        )
    return array


def _concrete(value: jax.Array) -> np.ndarray | None:
    """The value of ``value`` if it is known now (not traced under jit/grad/vmap), else None."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def _outcome(outcome: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    array = jnp.asarray(outcome)
    if not (jnp.issubdtype(array.dtype, jnp.integer) or jnp.issubdtype(array.dtype, jnp.floating)):
        raise TypeError(f"outcome must hold +1, -1 or 0 as integers, got dtype {array.dtype}.")
    if array.shape != shape:
        raise ValueError(
            f"outcome must have exactly the rewards' shape {shape} (one outcome per pair), got "
            f"shape {array.shape}."
        )
    known = _concrete(array)
    if known is not None and not np.all(np.isin(known, (-1, 0, 1))):
        raise ValueError(
            f"outcome must be +1 (a preferred), -1 (b preferred) or 0 (tie), got values "
            f"{np.unique(known).tolist()}."
        )
    return array


def _mask(where: ArrayLike | None, name: str, like: jax.Array, like_name: str) -> jax.Array | None:
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"{name} must be a boolean mask (True = real), got dtype {where.dtype}; pass "
            f"{name}.astype(bool)."
        )
    _same_shape(like_name, like, name, where)
    return where


def _listwise(
    rewards: ArrayLike, ranks: ArrayLike, where: ArrayLike | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    rewards = _rewards("rewards", rewards)
    if rewards.ndim < 1:
        raise ValueError(f"rewards must have a list axis last, shape [..., K], got shape {rewards.shape}.")
    ranks = jnp.asarray(ranks)
    if not jnp.issubdtype(ranks.dtype, jnp.integer):
        raise TypeError(f"ranks must be integers (0 = best, equal = tie), got dtype {ranks.dtype}.")
    _same_shape("rewards", rewards, "ranks", ranks)
    return rewards, ranks, _mask(where, "where", rewards, "rewards")


# Arithmetic helpers, used inside the jit-compiled functions.


def _compute_dtype(*rewards: jax.Array):
    """float32, or wider if the rewards are (float64 with x64 enabled)."""
    return jnp.promote_types(jnp.result_type(*rewards), jnp.float32)


def _float32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _real_slots(rewards: jax.Array, where: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Upcast rewards, with padded slots set to 0, and the mask (all True if None)."""
    rewards = rewards.astype(_compute_dtype(rewards))
    if where is None:
        return rewards, jnp.ones(rewards.shape, bool)
    # Padded slots may hold anything (even NaN): replace them before any arithmetic, so that they
    # reach neither the value nor, through a `where` further down, the gradient.
    return jnp.where(where, rewards, 0.0), where


# --------------------------------------------------------------------------------------------
# log σ(x)


@jax.custom_jvp
def _log_sigmoid(x: jax.Array) -> jax.Array:
    """log σ(x) = min(x, 0) − log1p(e^{−|x|}): one exp and one log1p, accurate for any x, no overflow.

    Differentiating that formula would give a derivative of 1 instead of ½ at x = 0, where ``|x|``
    and ``min`` have their kinks, so the derivative σ(−x) is supplied instead. The values are
    bit-identical to ``jax.nn.log_sigmoid``'s; on CPU the forward pass costs the same and forward
    plus backward about 1.4× less (its ``logaddexp`` derivative is the slow part), per
    ``benchmarks/log_sigmoid_check.py``.
    """
    return jnp.minimum(x, 0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


@_log_sigmoid.defjvp
def _log_sigmoid_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    # The primal through _log_sigmoid itself and σ through lax.logistic, whose own derivative rule
    # is σ(1 − σ): so second derivatives (and higher) are right at 0 too.
    return _log_sigmoid(x), jax.nn.sigmoid(-x) * x_dot


# --------------------------------------------------------------------------------------------
# Pairwise losses


REDUCTIONS = ("none", "mean", "sum")
"""The ``reduction`` values :func:`bradley_terry` takes."""


def bradley_terry(
    chosen_rewards: ArrayLike, rejected_rewards: ArrayLike, margin: ArrayLike = 0.0, *, reduction: str = "none"
) -> jax.Array:
    r"""Bradley–Terry negative log-likelihood of the chosen response being preferred.

    .. math::
        \ell = -\log \sigma(r_w - r_l - m)

    Under Bradley–Terry, :math:`P(y_w \succ y_l) = \sigma(r_w - r_l)`; this is the loss of
    InstructGPT's reward model. With a margin m > 0, the pair must be separated by at least m
    before the loss becomes small: Llama 2's margin loss, with m larger for pairs the annotators
    called "significantly better" (see :mod:`jaxrm.margins` and Qin et al. for the choice of m).

    Args:
      chosen_rewards: rewards r_w of the preferred responses, any shape.
      rejected_rewards: rewards r_l of the rejected responses, the same shape.
      margin: m, a scalar or an array of the rewards' shape.
      reduction: ``"none"`` (the loss of each pair), or ``"mean"`` / ``"sum"`` over all pairs: what
        ``masked_mean`` or ``jnp.sum`` of the losses gives, except that on the C++ pass (16,384 pairs or
        more, see the module notes) the per-pair losses are never written. ``jax.grad`` of the mean then
        reads each reward once and writes each gradient once, in one pass: at 10⁷ pairs it moves 200 MB
        where the losses then summed move 280 MB.

    Returns:
      float32: the loss of each pair, an array of the rewards' shape; or its mean or sum, a scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> chosen, rejected = jnp.array([3.2, -0.5, 0.0]), jnp.array([1.5, -2.0, 1.0])
      >>> with jnp.printoptions(precision=4): print(L.bradley_terry(chosen, rejected))
      [0.1678 0.2014 1.3133]
      >>> with jnp.printoptions(precision=4): print(L.bradley_terry(chosen, rejected, margin=1.0))
      [0.4032 0.4741 2.1269]
      >>> print(f"{L.bradley_terry(chosen, rejected, reduction='mean'):.4f}")
      0.5608

    References:
      Bradley, R. A. and Terry, M. E. (1952). Rank analysis of incomplete block designs: I. The
      method of paired comparisons. Biometrika 39(3/4), 324–345.

      Ouyang, L. et al. (2022). Training language models to follow instructions with human
      feedback. arXiv:2203.02155.

      Touvron, H. et al. (2023). Llama 2: Open foundation and fine-tuned chat models.
      arXiv:2307.09288.

      Qin, B., Feng, D. and Yang, X. (2024). Towards understanding the influence of reward margin
      on preference model performance. arXiv:2404.04932.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"bradley_terry: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    chosen, rejected = _pair("chosen_rewards", chosen_rewards, "rejected_rewards", rejected_rewards)
    return _bradley_terry(chosen, rejected, _option("margin", margin, chosen.shape), reduction)


@functools.partial(jax.jit, static_argnums=3)
def _bradley_terry(chosen, rejected, margin, reduction):
    dtype = _compute_dtype(chosen, rejected)
    chosen, rejected, margin = chosen.astype(dtype), rejected.astype(dtype), margin.astype(dtype)
    if pairwise.takes(chosen.shape, dtype):  # 16,384 pairs or more on one CPU
        if reduction == "none":
            return pairwise.bradley_terry_loss(chosen, rejected, margin)
        return pairwise.bradley_terry_reduced(chosen, rejected, margin, reduction)
    loss = _bradley_terry_formula(chosen, rejected, margin)
    if reduction == "none":
        return loss
    return jnp.mean(loss) if reduction == "mean" else jnp.sum(loss)


def _bradley_terry_formula(chosen, rejected, margin):
    return _float32(-_log_sigmoid(chosen - rejected - margin))


def hinge(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike, margin: ArrayLike = 1.0) -> jax.Array:
    r"""Hinge (max-margin) loss: zero once the chosen reward leads by at least the margin.

    .. math::
        \ell = \max(0,\; m - (r_w - r_l))

    At the kink :math:`r_w - r_l = m` the gradient is 0.

    Args:
      chosen_rewards: rewards r_w of the preferred responses, any shape.
      rejected_rewards: rewards r_l of the rejected responses, the same shape.
      margin: m, a scalar or an array of the rewards' shape (default 1).

    Returns:
      float32 array of the rewards' shape: the loss of each pair.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> chosen, rejected = jnp.array([3.2, -0.5, 0.0]), jnp.array([1.5, -2.0, 1.0])
      >>> with jnp.printoptions(precision=4): print(L.hinge(chosen, rejected))
      [0. 0. 2.]
      >>> with jnp.printoptions(precision=4): print(L.hinge(chosen, rejected, margin=2.0))
      [0.3 0.5 3. ]

    References:
      Herbrich, R., Graepel, T. and Obermayer, K. (2000). Large margin rank boundaries for ordinal
      regression. In Advances in Large Margin Classifiers, MIT Press, 115–132.
    """
    chosen, rejected = _pair("chosen_rewards", chosen_rewards, "rejected_rewards", rejected_rewards)
    return _hinge(chosen, rejected, _option("margin", margin, chosen.shape))


@jax.jit
def _hinge(chosen, rejected, margin):
    dtype = _compute_dtype(chosen, rejected)
    return _float32(jax.nn.relu(margin.astype(dtype) - (chosen.astype(dtype) - rejected.astype(dtype))))


def smoothed_bradley_terry(
    chosen_rewards: ArrayLike,
    rejected_rewards: ArrayLike,
    smoothing: ArrayLike,
    margin: ArrayLike = 0.0,
) -> jax.Array:
    r"""Bradley–Terry loss with label smoothing, for preference labels that are sometimes flipped.

    With :math:`\Delta = r_w - r_l - m` and smoothing :math:`\varepsilon`,

    .. math::
        \ell = -(1 - \varepsilon)\log\sigma(\Delta) - \varepsilon\log\sigma(-\Delta)
             = -\log\sigma(\Delta) + \varepsilon\,\Delta .

    It is the cross-entropy against the soft label :math:`1 - \varepsilon`: the loss is smallest at
    :math:`\sigma(\Delta) = 1 - \varepsilon` instead of pushing Δ to infinity. ε = 0 is
    :func:`bradley_terry`; ε = ½ makes every pair uninformative.

    Args:
      chosen_rewards: rewards r_w of the preferred responses, any shape.
      rejected_rewards: rewards r_l of the rejected responses, the same shape.
      smoothing: ε in [0, 1], the assumed probability that a label is flipped; a scalar or an
        array of the rewards' shape.
      margin: m, a scalar or an array of the rewards' shape.

    Returns:
      float32 array of the rewards' shape: the loss of each pair.

    Raises:
      ValueError: if ``smoothing`` is known (not traced) and outside [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> chosen, rejected = jnp.array([3.2, -0.5, 0.0]), jnp.array([1.5, -2.0, 1.0])
      >>> with jnp.printoptions(precision=4): print(L.smoothed_bradley_terry(chosen, rejected, 0.1))
      [0.3378 0.3514 1.2133]

    References:
      Szegedy, C. et al. (2016). Rethinking the Inception architecture for computer vision.
      arXiv:1512.00567.

      Wang, B. et al. (2024). Secrets of RLHF in large language models part II: Reward modeling.
      arXiv:2401.06080.
    """
    chosen, rejected = _pair("chosen_rewards", chosen_rewards, "rejected_rewards", rejected_rewards)
    smoothing = _option("smoothing", smoothing, chosen.shape)
    known = _concrete(smoothing)
    if known is not None and not np.all((known >= 0) & (known <= 1)):
        raise ValueError(f"smoothing must be in [0, 1], got {known.tolist()}.")
    return _smoothed_bradley_terry(chosen, rejected, smoothing, _option("margin", margin, chosen.shape))


@jax.jit
def _smoothed_bradley_terry(chosen, rejected, smoothing, margin):
    dtype = _compute_dtype(chosen, rejected)
    delta = chosen.astype(dtype) - rejected.astype(dtype) - margin.astype(dtype)
    # log σ(Δ) − log σ(−Δ) = Δ, so the two log-sigmoids reduce to one.
    return _float32(-_log_sigmoid(delta) + smoothing.astype(dtype) * delta)


def focal_bradley_terry(
    chosen_rewards: ArrayLike,
    rejected_rewards: ArrayLike,
    gamma: ArrayLike = 2.0,
    margin: ArrayLike = 0.0,
) -> jax.Array:
    r"""Focal Bradley–Terry loss: easy pairs (already well ranked) are down-weighted.

    With :math:`\Delta = r_w - r_l - m` and :math:`p = \sigma(\Delta)`,

    .. math::
        \ell = \big(1 - 2\,\mathrm{relu}(p - \tfrac12)\big)^{\gamma}\,\big(-\log p\big).

    The weight is 1 for pairs ranked wrongly (p ≤ ½) and falls to 0 as p → 1, so training
    concentrates on the hard pairs. This is the ranking loss of InternLM2's reward model; γ = 0 is
    :func:`bradley_terry`. The weight has a kink at Δ = 0, where its gradient is taken as 0 (the
    gradient of relu at 0).

    Args:
      chosen_rewards: rewards r_w of the preferred responses, any shape.
      rejected_rewards: rewards r_l of the rejected responses, the same shape.
      gamma: γ ≥ 0, the focusing exponent; a scalar or an array of the rewards' shape.
      margin: m, a scalar or an array of the rewards' shape.

    Returns:
      float32 array of the rewards' shape: the loss of each pair.

    Raises:
      ValueError: if ``gamma`` is known (not traced) and negative.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> chosen, rejected = jnp.array([3.2, -0.5, 0.0]), jnp.array([1.5, -2.0, 1.0])
      >>> with jnp.printoptions(precision=4): print(L.focal_bradley_terry(chosen, rejected))
      [0.016  0.0268 1.3133]

    References:
      Cai, Z. et al. (2024). InternLM2 technical report. arXiv:2403.17297.

      Lin, T.-Y. et al. (2017). Focal loss for dense object detection. arXiv:1708.02002.
    """
    chosen, rejected = _pair("chosen_rewards", chosen_rewards, "rejected_rewards", rejected_rewards)
    gamma = _option("gamma", gamma, chosen.shape)
    known = _concrete(gamma)
    if known is not None and not np.all(known >= 0):
        raise ValueError(f"gamma must be >= 0, got {known.tolist()}.")
    return _focal_bradley_terry(chosen, rejected, gamma, _option("margin", margin, chosen.shape))


@jax.jit
def _focal_bradley_terry(chosen, rejected, gamma, margin):
    dtype = _compute_dtype(chosen, rejected)
    delta = chosen.astype(dtype) - rejected.astype(dtype) - margin.astype(dtype)
    # For Δ > 0 the base 1 − 2(σ(Δ) − ½) is 2σ(−Δ). Raising it to γ in log space keeps the weight
    # and its derivative finite (0, not 0 · ∞) when σ(−Δ) underflows, for any γ ≥ 0.
    log_weight = jnp.where(delta > 0, gamma.astype(dtype) * (math.log(2.0) + _log_sigmoid(-delta)), 0.0)
    return _float32(jnp.exp(log_weight) * -_log_sigmoid(delta))


# --------------------------------------------------------------------------------------------
# Pairs with ties


def rao_kupper(
    rewards_a: ArrayLike, rewards_b: ArrayLike, outcome: ArrayLike, log_theta: ArrayLike
) -> jax.Array:
    r"""Rao–Kupper negative log-likelihood: Bradley–Terry with a threshold under which pairs tie.

    With :math:`\Delta = r_a - r_b` and :math:`\nu = \log\theta > 0`,

    .. math::
        P(a \succ b) = \sigma(\Delta - \nu), \qquad
        P(b \succ a) = \sigma(-\Delta - \nu), \qquad
        P(\text{tie}) = 1 - P(a \succ b) - P(b \succ a),

    and the loss is :math:`-\log P(\text{outcome})`. The tie probability is computed in log space,
    from :math:`P(\text{tie}) = (e^{2\nu} - 1)\,P(a \succ b)\,P(b \succ a)`, as a sum of three
    non-negative terms (so a likely tie keeps its small loss accurate):

    .. math::
        -\log P(\text{tie}) = -\log\sigma(\nu - \Delta) - \log\sigma(\nu + \Delta)
                              - \log\big(1 - e^{-2\nu}\big).

    Args:
      rewards_a: rewards of the first responses, any shape.
      rewards_b: rewards of the second responses, the same shape.
      outcome: +1 (a preferred), -1 (b preferred) or 0 (tie), integers of the rewards' shape.
        Under jit only the sign is used.
      log_theta: ν > 0, the log of Rao and Kupper's threshold θ > 1; a scalar or an array of the
        rewards' shape. It may be learned (it is differentiable); ν ≤ 0 gives NaN for ties.

    Returns:
      float32 array of the rewards' shape: the loss of each pair.

    Raises:
      ValueError: if ``log_theta`` or ``outcome`` is known (not traced) and out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> a, b = jnp.array([2.0, 2.0, 2.0]), jnp.array([0.0, 0.0, 0.0])
      >>> outcome = jnp.array([1, -1, 0])
      >>> with jnp.printoptions(precision=4): print(L.rao_kupper(a, b, outcome, log_theta=1.0))
      [0.3133 3.0486 1.5073]

    References:
      Rao, P. V. and Kupper, L. L. (1967). Ties in paired-comparison experiments: A generalization
      of the Bradley–Terry model. Journal of the American Statistical Association 62(317),
      194–204.
    """
    a, b = _pair("rewards_a", rewards_a, "rewards_b", rewards_b)
    outcome = _outcome(outcome, a.shape)
    log_theta = _option("log_theta", log_theta, a.shape)
    known = _concrete(log_theta)
    if known is not None and not np.all(known > 0):
        raise ValueError(f"log_theta must be > 0 (θ > 1), got {known.tolist()}.")
    return _rao_kupper(a, b, outcome, log_theta)


@jax.jit
def _rao_kupper(a, b, outcome, log_theta):
    dtype = _compute_dtype(a, b)
    delta = a.astype(dtype) - b.astype(dtype)
    nu = log_theta.astype(dtype)
    nll_a = -_log_sigmoid(delta - nu)
    nll_b = -_log_sigmoid(-delta - nu)
    # Three non-negative terms: no cancellation, so a likely tie keeps its small loss accurate.
    nll_tie = -_log_sigmoid(nu - delta) - _log_sigmoid(nu + delta) - _log1mexp(2.0 * nu)
    return _float32(jnp.where(outcome > 0, nll_a, jnp.where(outcome < 0, nll_b, nll_tie)))


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − e^{−x}) for x > 0, accurate for small and large x alike (Mächler 2012)."""
    return jnp.where(x > math.log(2.0), jnp.log1p(-jnp.exp(-x)), jnp.log(-jnp.expm1(-x)))


def davidson(
    rewards_a: ArrayLike, rewards_b: ArrayLike, outcome: ArrayLike, log_nu: ArrayLike
) -> jax.Array:
    r"""Davidson negative log-likelihood: Bradley–Terry with a tie probability ∝ the geometric mean.

    With strengths :math:`\pi = e^{r}` and :math:`\nu = e^{\text{log\_nu}} > 0`,

    .. math::
        P(a \succ b) = \frac{\pi_a}{D}, \qquad
        P(b \succ a) = \frac{\pi_b}{D}, \qquad
        P(\text{tie}) = \frac{\nu\sqrt{\pi_a \pi_b}}{D}, \qquad
        D = \pi_a + \pi_b + \nu\sqrt{\pi_a \pi_b},

    and the loss is :math:`-\log P(\text{outcome})`. Dividing through by
    :math:`\sqrt{\pi_a\pi_b}` leaves the log-scores :math:`s = (\Delta/2,\, -\Delta/2,\, \log\nu)`
    for (a, b, tie), with :math:`\Delta = r_a - r_b`, and with :math:`s_o` the observed one and
    :math:`s_p, s_q` the other two,

    .. math::
        -\log P(\text{outcome}) = -\log\sigma\big(-\operatorname{logaddexp}(s_p - s_o,\, s_q - s_o)\big),

    which depends on the rewards only through Δ and stays accurate when the loss is small.

    Args:
      rewards_a: rewards of the first responses, any shape.
      rewards_b: rewards of the second responses, the same shape.
      outcome: +1 (a preferred), -1 (b preferred) or 0 (tie), integers of the rewards' shape.
        Under jit only the sign is used.
      log_nu: log ν, any real number; a scalar or an array of the rewards' shape. It may be learned.

    Returns:
      float32 array of the rewards' shape: the loss of each pair.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> a, b = jnp.array([2.0, 2.0, 2.0]), jnp.array([0.0, 0.0, 0.0])
      >>> outcome = jnp.array([1, -1, 0])
      >>> with jnp.printoptions(precision=4): print(L.davidson(a, b, outcome, log_nu=0.0))
      [0.4076 2.4076 1.4076]

    References:
      Davidson, R. R. (1970). On extending the Bradley–Terry model to accommodate ties in paired
      comparison experiments. Journal of the American Statistical Association 65(329), 317–328.
    """
    a, b = _pair("rewards_a", rewards_a, "rewards_b", rewards_b)
    outcome = _outcome(outcome, a.shape)
    return _davidson(a, b, outcome, _option("log_nu", log_nu, a.shape))


@jax.jit
def _davidson(a, b, outcome, log_nu):
    dtype = _compute_dtype(a, b)
    half = (a.astype(dtype) - b.astype(dtype)) / 2
    log_nu = jnp.broadcast_to(log_nu.astype(dtype), half.shape)
    # The two log-scores not observed, minus the observed one (scores: Δ/2, −Δ/2, log ν).
    first = jnp.where(outcome > 0, -2 * half, jnp.where(outcome < 0, 2 * half, half - log_nu))
    second = jnp.where(outcome > 0, log_nu - half, jnp.where(outcome < 0, log_nu + half, -half - log_nu))
    return _float32(-_log_sigmoid(-jnp.logaddexp(first, second)))


# --------------------------------------------------------------------------------------------
# Listwise losses


def all_pairs(rewards: ArrayLike, ranks: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
    r"""Mean Bradley–Terry loss over every ordered pair of a ranking (InstructGPT's K-wise loss).

    A ranking of K responses is turned into all its pairs (i, j) with :math:`\rho_i < \rho_j`
    (i ranked better), both real, and

    .. math::
        \ell = \frac{1}{|\mathcal P|}\sum_{(i, j) \in \mathcal P} -\log\sigma(r_i - r_j),
        \qquad \mathcal P = \{(i, j) : \rho_i < \rho_j,\ i, j \text{ real}\}.

    For a strict ranking of K real responses :math:`|\mathcal P| = \binom K2`, InstructGPT's
    normalisation. Tied responses (equal ranks) form no pair. A list with no pair at all (fewer than
    two real responses, or all tied) has loss 0 and zero gradient. With K = 2 and ranks [0, 1] this
    is :func:`bradley_terry`.

    Args:
      rewards: ``[..., K]`` float rewards, one list of K responses per leading index.
      ranks: ``[..., K]`` integer ranks, 0 = best; only their order matters, equal = tie (their
        differences are taken in at least int32: ranks within ±2³⁰).
      where: optional ``[..., K]`` boolean mask of the real slots of padded lists. Padded slots
        contribute nothing to the value or the gradient, whatever they hold.

    Returns:
      float32 array of shape ``[...]``: the loss of each list.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> rewards = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 9.0]])
      >>> ranks = jnp.array([[0, 1, 2], [0, 1, 2]])
      >>> where = jnp.array([[True, True, True], [True, True, False]])
      >>> with jnp.printoptions(precision=4): print(L.all_pairs(rewards, ranks, where=where))
      [0.2512 2.1269]

    References:
      Ouyang, L. et al. (2022). Training language models to follow instructions with human
      feedback. arXiv:2203.02155.
    """
    return _all_pairs(*_listwise(rewards, ranks, where))


def _pair_differences(size: int) -> np.ndarray:
    """The [K, K(K−1)/2] matrix whose column p is e_i − e_j for the p-th slot pair i < j, so that x @ it
    holds every x_i − x_j."""
    first, second = np.triu_indices(size, 1)
    columns = np.arange(first.size)
    differences = np.zeros((size, first.size), np.int32)
    differences[first, columns], differences[second, columns] = 1, -1
    return differences


@jax.jit
def _all_pairs(rewards, ranks, where):
    # Each unordered pair of slots once, as a product with `_pair_differences`: the reward gaps, the rank
    # gaps (their sign: which slot is better, 0 a tie) and the count of real slots. Products keep the
    # pairs on the last axis, where XLA:CPU vectorises the log σ inside the sum over it, and their
    # gradient is one more product; the [K, K] form's reduction over two small axes ran the
    # exp and log1p scalar, 7x slower forward at K = 8 (benchmarks/RESULTS.md). The gaps are exact:
    # the other slots enter with weight 0 (padded ones are 0 by then), ±1 r rounds as r_i − r_j does.
    rewards, where = _real_slots(rewards, where)
    differences = _pair_differences(rewards.shape[-1])
    ranks = ranks.astype(jnp.promote_types(ranks.dtype, jnp.int32))
    gaps = jnp.tensordot(rewards, jnp.asarray(differences, rewards.dtype), axes=1,
                         precision=jax.lax.Precision.HIGHEST)
    rank_gaps = jnp.tensordot(ranks, jnp.asarray(differences, ranks.dtype), axes=1)
    both_real = jnp.tensordot(where.astype(jnp.int32), jnp.asarray(np.abs(differences)), axes=1) == 2
    pairs = both_real & (rank_gaps != 0)
    pair_losses = -_log_sigmoid(jnp.where(rank_gaps < 0, gaps, -gaps))  # the better slot's reward first
    total = jnp.sum(jnp.where(pairs, pair_losses, 0.0), axis=-1)
    count = jnp.sum(pairs, axis=-1)
    return _float32(total / jnp.maximum(count, 1).astype(total.dtype))


def plackett_luce(rewards: ArrayLike, ranks: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
    r"""Plackett–Luce negative log-likelihood of a full ranking.

    The ranking is read as K successive choices, each of the best remaining response with
    probability softmax over those remaining. With σ the order by rank (best first) over the real
    slots,

    .. math::
        \ell = -\sum_{k} \Big[r_{\sigma(k)} - \log\sum_{j \ge k} e^{r_{\sigma(j)}}\Big]
             = -\sum_{k} \log\sigma\Big(r_{\sigma(k)} - \log\sum_{j > k} e^{r_{\sigma(j)}}\Big),

    the second form being how it is computed (the last choice, with nothing left, contributes 0).

    Equal ranks are broken by slot index (the earlier slot is taken as better), so a tie is
    counted as an order; use :func:`all_pairs` to leave ties out. A list with fewer than two real
    slots has loss 0. With K = 2 this is :func:`bradley_terry`.

    Args:
      rewards: ``[..., K]`` float rewards, one list of K responses per leading index.
      ranks: ``[..., K]`` integer ranks, 0 = best; only their order matters.
      where: optional ``[..., K]`` boolean mask of the real slots of padded lists. Padded slots
        contribute nothing to the value or the gradient, whatever they hold.

    Returns:
      float32 array of shape ``[...]``: the loss of each list.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> rewards = jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
      >>> ranks = jnp.array([[0, 1, 2], [0, 1, 2]])
      >>> with jnp.printoptions(precision=4): print(L.plackett_luce(rewards, ranks))
      [0.7209 3.7209]

    References:
      Plackett, R. L. (1975). The analysis of permutations. Journal of the Royal Statistical
      Society, Series C 24(2), 193–202.

      Luce, R. D. (1959). Individual Choice Behavior. Wiley.
    """
    return _plackett_luce(*_listwise(rewards, ranks, where))


@jax.jit
def _plackett_luce(rewards, ranks, where):
    rewards, where = _real_slots(rewards, where)
    slot = jnp.arange(rewards.shape[-1])
    rank_i, rank_j = ranks[..., :, None], ranks[..., None, :]
    # after[..., i, j]: real slot j comes after slot i in the order (ties broken by slot index).
    after = ((rank_j > rank_i) | ((rank_j == rank_i) & (slot > slot[:, None]))) & where[..., None, :]
    has_rest = jnp.any(after, axis=-1)
    # Choosing i among i and the slots after it has log-probability log σ(r_i − LSE_rest r_j):
    # log σ rather than r_i − logsumexp keeps small losses accurate, and K = 2 is bradley_terry.
    # Rows with nothing after them (the last choice, padded slots) get a harmless stand-in, the
    # diagonal, so that no logsumexp is over nothing; their terms are dropped below.
    rest = jnp.where(has_rest[..., None], after, jnp.eye(rewards.shape[-1], dtype=bool))
    gaps = rewards[..., None, :] - rewards[..., :, None]
    log_rest = jax.nn.logsumexp(gaps, axis=-1, where=rest)
    choices = jnp.where(where & has_rest, _log_sigmoid(-log_rest), 0.0)
    return _float32(-jnp.sum(choices, axis=-1))


# --------------------------------------------------------------------------------------------
# Regularisers


def centering(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike) -> jax.Array:
    r"""Reward-centering penalty: pulls the rewards of each pair towards mean zero.

    .. math::
        \ell = (r_w + r_l)^2

    Bradley–Terry sees only differences, so rewards can drift by any constant; this term (TRL's
    ``center_rewards_coefficient``, Eisenstein et al.) pins the constant down. It is not shift
    invariant, by design.

    Args:
      chosen_rewards: rewards r_w of the preferred responses, any shape.
      rejected_rewards: rewards r_l of the rejected responses, the same shape.

    Returns:
      float32 array of the rewards' shape.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> chosen, rejected = jnp.array([3.2, -0.5]), jnp.array([1.5, -2.0])
      >>> with jnp.printoptions(precision=4): print(L.centering(chosen, rejected))
      [22.09  6.25]

    References:
      Eisenstein, J. et al. (2023). Helping or herding? Reward model ensembles mitigate but do not
      eliminate reward hacking. arXiv:2312.09244.
    """
    chosen, rejected = _pair("chosen_rewards", chosen_rewards, "rejected_rewards", rejected_rewards)
    return _centering(chosen, rejected)


@jax.jit
def _centering(chosen, rejected):
    dtype = _compute_dtype(chosen, rejected)
    return _float32(jnp.square(chosen.astype(dtype) + rejected.astype(dtype)))


def l2(rewards: ArrayLike) -> jax.Array:
    r"""Squared reward, a penalty that keeps rewards small.

    .. math::
        \ell = r^2

    Args:
      rewards: float rewards, any shape.

    Returns:
      float32 array of the rewards' shape.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> with jnp.printoptions(precision=4): print(L.l2(jnp.array([3.0, -0.5])))
      [9.   0.25]

    References:
      Touvron, H. et al. (2023). Llama 2: Open foundation and fine-tuned chat models.
      arXiv:2307.09288.
    """
    return _l2(_rewards("rewards", rewards))


@jax.jit
def _l2(rewards):
    return _float32(jnp.square(rewards.astype(_compute_dtype(rewards))))


# --------------------------------------------------------------------------------------------
# Reduction and metrics


def masked_mean(
    values: ArrayLike,
    where: ArrayLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Mean of the real entries of ``values``, exact across devices with ``axis_name``.

    .. math::
        \bar v = \frac{\sum_i w_i v_i}{\sum_i w_i}

    With ``axis_name`` (inside ``jax.shard_map`` or ``jax.pmap``) both sums are ``psum``-ed over
    those mesh axes, so the result is the mean over every real entry on every device, not a mean of
    per-device means (which over-weights devices holding much padding). With no real entry anywhere
    the result is 0, with a zero (finite) gradient. Masked entries may hold anything, NaN included.

    Args:
      values: numeric array, any shape (e.g. per-example losses).
      where: optional boolean mask of the values' shape, True = real.
      axis_name: a mesh axis name, or a tuple of them (e.g. ``("data", "fsdp")``), to sum over.

    Returns:
      float32 scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> losses = jnp.array([1.0, 2.0, 6.0, jnp.nan])
      >>> print(L.masked_mean(losses, where=jnp.array([True, True, True, False])))
      3.0
      >>> print(L.masked_mean(losses, where=jnp.zeros(4, bool)))
      0.0
    """
    values = jnp.asarray(values)
    if not (
        jnp.issubdtype(values.dtype, jnp.floating)
        or jnp.issubdtype(values.dtype, jnp.integer)
        or values.dtype == jnp.bool_
    ):
        raise TypeError(f"values must be a real array, got dtype {values.dtype}.")
    where = _mask(where, "where", values, "values")
    if axis_name is not None:
        if isinstance(axis_name, list):
            axis_name = tuple(axis_name)
        names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
        if not names or not all(isinstance(name, str) for name in names):
            raise TypeError(f"axis_name must be a mesh axis name or a tuple of them, got {axis_name!r}.")
    return _masked_mean(values, where, axis_name)


@functools.partial(jax.jit, static_argnames="axis_name")
def _masked_mean(values, where, axis_name):
    values, where = _real_slots(values, where)
    total = jnp.sum(values)
    count = jnp.sum(where, dtype=jnp.int32)
    if axis_name is not None:
        total, count = jax.lax.psum((total, count), axis_name)
    return _float32(total / jnp.maximum(count, 1).astype(total.dtype))


def preference_probability(rewards_a: ArrayLike, rewards_b: ArrayLike) -> jax.Array:
    r"""Bradley–Terry probability that response a is preferred to response b.

    .. math::
        P(a \succ b) = \sigma(r_a - r_b)

    Args:
      rewards_a: rewards of the first responses, any shape.
      rewards_b: rewards of the second responses, the same shape.

    Returns:
      float32 array of the rewards' shape.

    Example:
      >>> import jaxrm.losses as L
      >>> print(round(float(L.preference_probability(2.0, -0.2)), 4))
      0.9002

    References:
      Bradley, R. A. and Terry, M. E. (1952). Rank analysis of incomplete block designs: I. The
      method of paired comparisons. Biometrika 39(3/4), 324–345.
    """
    return _preference_probability(*_pair("rewards_a", rewards_a, "rewards_b", rewards_b))


@jax.jit
def _preference_probability(a, b):
    dtype = _compute_dtype(a, b)
    return _float32(jax.nn.sigmoid(a.astype(dtype) - b.astype(dtype)))


def accuracy(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike) -> jax.Array:
    r"""1 where the chosen response scores strictly higher, else 0 (ties count as wrong).

    .. math::
        \mathrm{acc} = \mathbb 1[r_w > r_l]

    Ties count as wrong, as in TRL's reward trainer and RewardBench: a model that scores everything
    the same gets 0, not ½.

    Args:
      chosen_rewards: rewards r_w of the preferred responses, any shape.
      rejected_rewards: rewards r_l of the rejected responses, the same shape.

    Returns:
      float32 array of the rewards' shape, of 0s and 1s; reduce with :func:`masked_mean`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxrm.losses as L
      >>> print(L.accuracy(jnp.array([3.2, -0.5, 1.0]), jnp.array([1.5, -2.0, 1.0])))
      [1. 1. 0.]

    References:
      Lambert, N. et al. (2024). RewardBench: Evaluating reward models for language modeling.
      arXiv:2403.13787.
    """
    return _accuracy(*_pair("chosen_rewards", chosen_rewards, "rejected_rewards", rejected_rewards))


@jax.jit
def _accuracy(chosen, rejected):
    dtype = _compute_dtype(chosen, rejected)
    return _float32(chosen.astype(dtype) > rejected.astype(dtype))


#: Pairwise losses by config name: ``fn(chosen_rewards, rejected_rewards, ..., margin=...)``.
PAIRWISE_LOSSES = {
    "bradley_terry": bradley_terry,
    "hinge": hinge,
    "smoothed_bradley_terry": smoothed_bradley_terry,
    "focal_bradley_terry": focal_bradley_terry,
}

#: Losses for pairs that may tie, by config name: ``fn(rewards_a, rewards_b, outcome, parameter)``.
TIE_LOSSES = {
    "rao_kupper": rao_kupper,
    "davidson": davidson,
}

#: Listwise losses by config name: ``fn(rewards, ranks, where=None)``.
LISTWISE_LOSSES = {
    "all_pairs": all_pairs,
    "plackett_luce": plackett_luce,
}
