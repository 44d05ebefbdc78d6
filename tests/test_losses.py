"""jaxrm.losses against plain float64 NumPy references, at the extremes, in low precision, on meshes.

The references below are the textbook formulas written as plainly as possible (explicit loops for
the listwise losses); they share no code with the module.
"""

import doctest
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jaxrm.losses as L
from jaxrm.losses import _log_sigmoid

TOL = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# float64 references


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_bradley_terry(chosen, rejected, margin=0.0):
    return -np.log(sigmoid(chosen - rejected - margin))


def ref_hinge(chosen, rejected, margin=1.0):
    return np.maximum(0.0, margin - (chosen - rejected))


def ref_smoothed(chosen, rejected, smoothing, margin=0.0):
    delta = chosen - rejected - margin
    return -(1 - smoothing) * np.log(sigmoid(delta)) - smoothing * np.log(sigmoid(-delta))


def ref_focal(chosen, rejected, gamma=2.0, margin=0.0):
    p = sigmoid(chosen - rejected - margin)
    return (1 - 2 * np.maximum(p - 0.5, 0.0)) ** gamma * -np.log(p)


def ref_rao_kupper(a, b, outcome, log_theta):
    p_a = sigmoid(a - b - log_theta)
    p_b = sigmoid(b - a - log_theta)
    p_tie = 1 - p_a - p_b
    return -np.log(np.where(outcome == 1, p_a, np.where(outcome == -1, p_b, p_tie)))


def ref_davidson(a, b, outcome, log_nu):
    pi_a, pi_b, nu = np.exp(a), np.exp(b), np.exp(log_nu)
    tie = nu * np.sqrt(pi_a * pi_b)
    d = pi_a + pi_b + tie
    return -np.log(np.where(outcome == 1, pi_a / d, np.where(outcome == -1, pi_b / d, tie / d)))


def ref_all_pairs(rewards, ranks, where):
    out = []
    for r, k, w in zip(rewards, ranks, where):
        terms = []
        for i in range(len(r)):
            for j in range(len(r)):
                if w[i] and w[j] and k[i] < k[j]:
                    terms.append(-np.log(sigmoid(r[i] - r[j])))
        out.append(np.mean(terms) if terms else 0.0)
    return np.array(out)


def ref_plackett_luce(rewards, ranks, where):
    out = []
    for r, k, w in zip(rewards, ranks, where):
        order = sorted((i for i in range(len(r)) if w[i]), key=lambda i: (k[i], i))
        loss = 0.0
        for position, i in enumerate(order):
            loss -= r[i] - np.log(sum(np.exp(r[j]) for j in order[position:]))
        out.append(loss)
    return np.array(out)


def ref_masked_mean(values, where):
    return values[where].sum() / where.sum() if where.any() else 0.0


# --------------------------------------------------------------------------------------------
# Inputs: float32 arrays, with the float64 copies the references take.

RNG = np.random.default_rng(0)
SHAPE = (3, 7)
CHOSEN = RNG.normal(0, 2, SHAPE).astype(np.float32)
REJECTED = RNG.normal(0, 2, SHAPE).astype(np.float32)
MARGIN = RNG.uniform(0, 2, SHAPE).astype(np.float32)
OUTCOME = RNG.integers(-1, 2, SHAPE).astype(np.int32)
LIST_REWARDS = RNG.normal(0, 2, (6, 5)).astype(np.float32)
LIST_RANKS = RNG.integers(0, 4, (6, 5)).astype(np.int32)  # ties included
LIST_WHERE = RNG.uniform(size=(6, 5)) < 0.7
LIST_WHERE[0] = False  # no real slot
LIST_WHERE[1] = [False, False, True, False, False]  # one real slot
LIST_WHERE[2] = True  # all real
LIST_RANKS[3] = 1  # all tied: no pair for all_pairs

# name -> (function, reference, args, indices of the reward arguments)
CASES = {
    "bradley_terry": (L.bradley_terry, ref_bradley_terry, (CHOSEN, REJECTED), (0, 1)),
    "bradley_terry_margin": (L.bradley_terry, ref_bradley_terry, (CHOSEN, REJECTED, MARGIN), (0, 1)),
    "bradley_terry_scalar_margin": (L.bradley_terry, ref_bradley_terry, (CHOSEN, REJECTED, np.float32(0.5)), (0, 1)),
    "hinge": (L.hinge, ref_hinge, (CHOSEN, REJECTED), (0, 1)),
    "hinge_margin": (L.hinge, ref_hinge, (CHOSEN, REJECTED, MARGIN), (0, 1)),
    "smoothed_bradley_terry": (L.smoothed_bradley_terry, ref_smoothed, (CHOSEN, REJECTED, np.float32(0.1)), (0, 1)),
    "smoothed_bradley_terry_margin": (
        L.smoothed_bradley_terry, ref_smoothed, (CHOSEN, REJECTED, np.float32(0.3), MARGIN), (0, 1)),
    "focal_bradley_terry": (L.focal_bradley_terry, ref_focal, (CHOSEN, REJECTED), (0, 1)),
    "focal_bradley_terry_gamma_margin": (
        L.focal_bradley_terry, ref_focal, (CHOSEN, REJECTED, np.float32(0.5), MARGIN), (0, 1)),
    "rao_kupper": (L.rao_kupper, ref_rao_kupper, (CHOSEN, REJECTED, OUTCOME, np.float32(0.7)), (0, 1)),
    "rao_kupper_per_pair": (L.rao_kupper, ref_rao_kupper, (CHOSEN, REJECTED, OUTCOME, MARGIN + 0.1), (0, 1)),
    "davidson": (L.davidson, ref_davidson, (CHOSEN, REJECTED, OUTCOME, np.float32(-0.3)), (0, 1)),
    "davidson_per_pair": (L.davidson, ref_davidson, (CHOSEN, REJECTED, OUTCOME, MARGIN - 1), (0, 1)),
    "all_pairs": (L.all_pairs, ref_all_pairs, (LIST_REWARDS, LIST_RANKS, LIST_WHERE), (0,)),
    "plackett_luce": (L.plackett_luce, ref_plackett_luce, (LIST_REWARDS, LIST_RANKS, LIST_WHERE), (0,)),
    "centering": (L.centering, lambda w, r: (w + r) ** 2, (CHOSEN, REJECTED), ()),
    "l2": (L.l2, lambda r: r**2, (CHOSEN,), ()),
    "masked_mean": (L.masked_mean, ref_masked_mean, (CHOSEN, CHOSEN > 0), ()),
    "preference_probability": (L.preference_probability, lambda a, b: sigmoid(a - b), (CHOSEN, REJECTED), (0, 1)),
    "accuracy": (
        L.accuracy, lambda w, r: (w > r).astype(float),
        (CHOSEN, np.where(np.arange(7) < 2, CHOSEN, REJECTED).astype(np.float32)), (0, 1)),  # with exact ties
}
SHIFT_INVARIANT = [name for name, case in CASES.items() if case[3]]


def as_float64(args):
    return [np.asarray(a, np.float64) if np.asarray(a).dtype == np.float32 else np.asarray(a) for a in args]


@pytest.mark.parametrize("name", CASES)
def test_matches_float64_reference_under_jit(name):
    fn, ref, args, _ = CASES[name]
    actual = jax.jit(fn)(*args)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, ref(*as_float64(args)), **TOL)


def test_references_are_not_degenerate():
    # The listwise inputs exercise every case the references distinguish.
    pairs = ref_all_pairs(LIST_REWARDS, LIST_RANKS, LIST_WHERE)
    assert pairs[0] == pairs[1] == pairs[3] == 0 and np.all(pairs[[2, 4, 5]] > 0)
    assert set(np.unique(OUTCOME)) == {-1, 0, 1}


@pytest.mark.parametrize("name", SHIFT_INVARIANT)
def test_adding_a_constant_to_every_reward_changes_nothing(name):
    fn, _, args, reward_indices = CASES[name]
    shifted = [a + np.float32(37.25) if i in reward_indices else a for i, a in enumerate(args)]
    np.testing.assert_allclose(jax.jit(fn)(*shifted), jax.jit(fn)(*args), rtol=1e-5, atol=2e-5)


def test_regularisers_are_not_shift_invariant():
    assert not np.allclose(L.centering(CHOSEN + 1, REJECTED + 1), L.centering(CHOSEN, REJECTED))
    assert not np.allclose(L.l2(CHOSEN + 1), L.l2(CHOSEN))


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_pairwise_registry_matches_references(self):
        refs = {"bradley_terry": ref_bradley_terry, "hinge": ref_hinge, "focal_bradley_terry": ref_focal}
        for name, ref in refs.items():
            actual = self.variant(L.PAIRWISE_LOSSES[name])(CHOSEN, REJECTED, margin=MARGIN)
            chex.assert_trees_all_close(actual, ref(*as_float64((CHOSEN, REJECTED)), margin=MARGIN), **TOL)
        smoothed = self.variant(L.PAIRWISE_LOSSES["smoothed_bradley_terry"])(CHOSEN, REJECTED, 0.2)
        chex.assert_trees_all_close(smoothed, ref_smoothed(*as_float64((CHOSEN, REJECTED)), 0.2), **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_tie_and_listwise_registries_match_references(self):
        a, b = as_float64((CHOSEN, REJECTED))
        chex.assert_trees_all_close(
            self.variant(L.TIE_LOSSES["rao_kupper"])(CHOSEN, REJECTED, OUTCOME, 0.4),
            ref_rao_kupper(a, b, OUTCOME, 0.4), **TOL)
        chex.assert_trees_all_close(
            self.variant(L.TIE_LOSSES["davidson"])(CHOSEN, REJECTED, OUTCOME, 0.4),
            ref_davidson(a, b, OUTCOME, 0.4), **TOL)
        refs = {"all_pairs": ref_all_pairs, "plackett_luce": ref_plackett_luce}
        for name, ref in refs.items():
            actual = self.variant(L.LISTWISE_LOSSES[name])(LIST_REWARDS, LIST_RANKS, where=LIST_WHERE)
            chex.assert_trees_all_close(actual, ref(LIST_REWARDS.astype(np.float64), LIST_RANKS, LIST_WHERE), **TOL)


def test_registries_name_exactly_the_public_losses():
    assert L.PAIRWISE_LOSSES == {"bradley_terry": L.bradley_terry, "hinge": L.hinge,
                                 "smoothed_bradley_terry": L.smoothed_bradley_terry,
                                 "focal_bradley_terry": L.focal_bradley_terry}
    assert L.TIE_LOSSES == {"rao_kupper": L.rao_kupper, "davidson": L.davidson}
    assert L.LISTWISE_LOSSES == {"all_pairs": L.all_pairs, "plackett_luce": L.plackett_luce}
    assert all(callable(getattr(L, name)) or isinstance(getattr(L, name), dict) for name in L.__all__)


# --------------------------------------------------------------------------------------------
# log σ and gradients where branches meet


def exact_sigmoid_neg(x):
    """σ(−x) in float64 without overflow."""
    return np.exp(-np.logaddexp(0.0, np.asarray(x, np.float64)))


def test_log_sigmoid_value_and_gradient_exact_at_kinks_and_far_out():
    points = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 0.5, -0.5, 20.0, -20.0, 88.0, -88.0, 1e4, -1e4],
                      np.float32)
    values = jax.jit(_log_sigmoid)(points)
    np.testing.assert_allclose(values, -np.logaddexp(0.0, -points.astype(np.float64)), rtol=1e-6, atol=1e-30)
    grads = jax.jit(jax.vmap(jax.grad(_log_sigmoid)))(points)
    np.testing.assert_allclose(grads, exact_sigmoid_neg(points), rtol=1e-6, atol=1e-30)
    assert grads[0] == grads[1] == 0.5
    # Second derivative −σ(x)σ(−x): −¼ at 0, where the formula's |x| and min have their kinks.
    second = jax.jit(jax.vmap(jax.grad(jax.grad(_log_sigmoid))))(points)
    x = points.astype(np.float64)
    # (lax.logistic's own rule, σ(1 − σ), loses relative precision once σ rounds to 1: hence atol.)
    np.testing.assert_allclose(second, -exact_sigmoid_neg(x) * exact_sigmoid_neg(-x), rtol=1e-5, atol=1e-7)
    assert second[0] == -0.25
    # Forward-over-reverse, too.
    tangent = jax.jvp(jax.value_and_grad(_log_sigmoid), (jnp.float32(0.0),), (jnp.float32(1.0),))[1]
    assert tangent == (0.5, -0.25)


def test_log_sigmoid_matches_jax_nn_on_a_grid():
    x = np.linspace(-120, 120, 100_001, dtype=np.float32)
    np.testing.assert_allclose(_log_sigmoid(x), jax.nn.log_sigmoid(x), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(jax.grad(lambda v: _log_sigmoid(v).sum())(x),
                               jax.grad(lambda v: jax.nn.log_sigmoid(v).sum())(x), rtol=1e-6, atol=1e-30)


def test_pairwise_gradients_at_zero_and_at_the_kinks():
    zero = jnp.zeros(3)
    grad_chosen = lambda fn, *args, **kw: jax.grad(lambda c: fn(c, zero, *args, **kw).sum())(zero)  # noqa: E731
    np.testing.assert_array_equal(grad_chosen(L.bradley_terry), -0.5)
    np.testing.assert_allclose(grad_chosen(L.smoothed_bradley_terry, 0.1), -0.5 + 0.1, rtol=1e-7)
    # Focal: the weight's kink at Δ = 0 takes relu's gradient there (0), leaving −σ(0).
    np.testing.assert_array_equal(grad_chosen(L.focal_bradley_terry, 2.0), -0.5)
    # Hinge at its kink Δ = m takes relu's gradient 0; just inside, −1.
    np.testing.assert_array_equal(grad_chosen(L.hinge, margin=0.0), 0.0)
    np.testing.assert_array_equal(grad_chosen(L.hinge, margin=1e-3), -1.0)


def test_tie_gradients_match_analytic_derivatives_where_branches_meet():
    # Rao–Kupper: d/dr_a of −log P is −σ(ν − Δ), σ(ν + Δ), and their sum for a tie.
    nu = 0.8
    delta = np.array([0.0, nu, -nu, 1e4, -1e4], np.float32)
    for outcome, expected in [(1, -exact_sigmoid_neg(delta - nu)), (-1, exact_sigmoid_neg(-delta - nu)),
                              (0, exact_sigmoid_neg(-delta - nu) - exact_sigmoid_neg(delta - nu))]:
        o = jnp.full(delta.shape, outcome)
        grad = jax.grad(lambda a: L.rao_kupper(a, jnp.zeros_like(a), o, nu).sum())(delta)
        np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)
    # Davidson: d/dr_a of −log P(o) is (P_a − P_b)/2 − s_o, s = ½, −½, 0; the logsumexp's terms are
    # equal at Δ = 0 and at Δ/2 = ±log ν.
    log_nu = 0.3
    delta = np.array([0.0, 2 * log_nu, -2 * log_nu, 1e4, -1e4], np.float32)
    scores = np.stack([delta / 2, -delta / 2, np.full(delta.shape, log_nu)]).astype(np.float64)
    p = np.exp(scores - np.logaddexp.reduce(scores, axis=0))
    for outcome, s in [(1, 0.5), (-1, -0.5), (0, 0.0)]:
        o = jnp.full(delta.shape, outcome)
        grad = jax.grad(lambda a: L.davidson(a, jnp.zeros_like(a), o, log_nu).sum())(delta)
        np.testing.assert_allclose(grad, (p[0] - p[1]) / 2 - s, rtol=1e-6, atol=1e-7)


AWAY_FROM_KINKS = np.where(np.abs(CHOSEN - REJECTED - 1.0) < 0.1, CHOSEN + 0.5, CHOSEN).astype(np.float32)
AWAY_FROM_ZERO = np.where(np.abs(CHOSEN - REJECTED) < 0.1, CHOSEN + 0.5, CHOSEN).astype(np.float32)
GRAD_CASES = {
    "bradley_terry": (lambda w, r, m: L.bradley_terry(w, r, m), (CHOSEN, REJECTED, MARGIN)),
    "hinge": (lambda w, r: L.hinge(w, r), (AWAY_FROM_KINKS, REJECTED)),
    "smoothed_bradley_terry": (lambda w, r, m: L.smoothed_bradley_terry(w, r, 0.2, m), (CHOSEN, REJECTED, MARGIN)),
    "focal_bradley_terry": (
        lambda w, r, g: L.focal_bradley_terry(w, r, g), (AWAY_FROM_ZERO, REJECTED, np.float32(1.5))),
    "rao_kupper": (lambda a, b, nu: L.rao_kupper(a, b, OUTCOME, nu), (CHOSEN, REJECTED, np.float32(0.7))),
    "davidson": (lambda a, b, nu: L.davidson(a, b, OUTCOME, nu), (CHOSEN, REJECTED, np.float32(-0.3))),
    "all_pairs": (lambda r: L.all_pairs(r, LIST_RANKS, LIST_WHERE), (LIST_REWARDS,)),
    "plackett_luce": (lambda r: L.plackett_luce(r, LIST_RANKS, LIST_WHERE), (LIST_REWARDS,)),
    "centering": (L.centering, (CHOSEN, REJECTED)),
    "l2": (L.l2, (CHOSEN / 4,)),  # float32 finite differences of r² lose too much far out
    "masked_mean": (lambda v: L.masked_mean(v, CHOSEN > 0), (REJECTED,)),
    "preference_probability": (L.preference_probability, (CHOSEN, REJECTED)),
}


@pytest.mark.parametrize("name", GRAD_CASES)
def test_check_grads(name):
    fn, args = GRAD_CASES[name]
    check_grads(jax.jit(fn), args, order=1, modes=("rev",))


# --------------------------------------------------------------------------------------------
# Extremes and low precision

EXTREME_DELTA = np.array([-1e4, -1e3, -100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 1e3, 1e4], np.float32)
# Every gap with every outcome, for the tie losses.
EXTREME_OUTCOME = np.repeat(np.array([1, -1, 0], np.int32), EXTREME_DELTA.size)
THREE_SLOTS = np.tile(np.array([0, 2, 1], np.int32), (3 * EXTREME_DELTA.size, 1))
EXTREME_FNS = {
    "bradley_terry": lambda w, r: L.bradley_terry(w, r, 0.5),
    "hinge": L.hinge,
    "smoothed_bradley_terry": lambda w, r: L.smoothed_bradley_terry(w, r, 0.1),
    "focal_bradley_terry": L.focal_bradley_terry,
    "focal_bradley_terry_small_gamma": lambda w, r: L.focal_bradley_terry(w, r, 0.5),
    "rao_kupper": lambda a, b: L.rao_kupper(a, b, EXTREME_OUTCOME, 0.5),
    "rao_kupper_tiny_theta": lambda a, b: L.rao_kupper(a, b, EXTREME_OUTCOME, 1e-6),
    "davidson": lambda a, b: L.davidson(a, b, EXTREME_OUTCOME, 0.5),
    "preference_probability": L.preference_probability,
    "all_pairs": lambda a, b: L.all_pairs(jnp.stack([a, b, 0 * a], -1), THREE_SLOTS),
    "plackett_luce": lambda a, b: L.plackett_luce(jnp.stack([a, b, 0 * a], -1), THREE_SLOTS),
}


@pytest.mark.parametrize("name", EXTREME_FNS)
def test_extreme_reward_gaps_give_finite_values_and_gradients(name):
    fn = EXTREME_FNS[name]
    chosen, rejected = np.tile(EXTREME_DELTA / 2, 3), np.tile(-EXTREME_DELTA / 2, 3)
    value_and_grad = jax.value_and_grad(lambda w, r: (fn(w, r).sum(), fn(w, r)), argnums=(0, 1), has_aux=True)
    (_, values), grads = jax.jit(value_and_grad)(chosen, rejected)
    assert np.all(np.isfinite(values)) and all(np.all(np.isfinite(g)) for g in grads)


def test_extreme_values_match_stable_references():
    d = EXTREME_DELTA.astype(np.float64)
    softplus = lambda x: np.logaddexp(0.0, x)  # noqa: E731
    np.testing.assert_allclose(L.bradley_terry(EXTREME_DELTA, 0 * EXTREME_DELTA), softplus(-d), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(L.smoothed_bradley_terry(EXTREME_DELTA, 0 * EXTREME_DELTA, 0.1),
                               0.9 * softplus(-d) + 0.1 * softplus(d), rtol=1e-6, atol=1e-6)
    outcome = np.zeros(d.shape, np.int32)
    # −log P(tie) = softplus(ν − Δ) + softplus(ν + Δ) − log(e^{2ν} − 1)
    np.testing.assert_allclose(L.rao_kupper(EXTREME_DELTA, 0 * EXTREME_DELTA, outcome, 0.5),
                               softplus(0.5 - d) + softplus(0.5 + d) - np.log(np.expm1(1.0)), rtol=1e-6, atol=1e-6)
    # Davidson's tie: log(e^{Δ/2} + e^{−Δ/2} + ν) − log ν
    np.testing.assert_allclose(L.davidson(EXTREME_DELTA, 0 * EXTREME_DELTA, outcome, 0.5),
                               np.logaddexp.reduce([d / 2, -d / 2, np.full_like(d, 0.5)]) - 0.5, rtol=1e-6, atol=1e-6)


def test_small_losses_keep_relative_precision():
    # Where the loss is tiny (a confident correct ranking) it is still accurate relative to itself.
    delta = np.array([10.0, 20.0, 40.0], np.float32)
    outcome = np.ones(3, np.int32)
    expected = np.logaddexp.reduce([np.zeros(3), -delta.astype(np.float64), 0.0 - delta / 2.0], axis=0)
    np.testing.assert_allclose(L.davidson(delta, 0 * delta, outcome, 0.0), expected, rtol=1e-5)
    np.testing.assert_allclose(L.bradley_terry(delta, 0 * delta), np.log1p(np.exp(-delta.astype(np.float64))),
                               rtol=1e-5)


LOW_PRECISION_CASES = {name: CASES[name] for name in [
    "bradley_terry_margin", "hinge_margin", "smoothed_bradley_terry", "focal_bradley_terry_gamma_margin",
    "rao_kupper", "davidson", "all_pairs", "plackett_luce", "centering", "l2", "preference_probability"]}


@pytest.mark.parametrize("dtype,tolerance", [(jnp.bfloat16, 5e-2), (jnp.float16, 5e-3)])
@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_low_precision_inputs_compute_in_float32(name, dtype, tolerance):
    fn, _, args, _ = LOW_PRECISION_CASES[name]
    floats = {i for i, a in enumerate(args) if np.asarray(a).dtype == np.float32 and i in (0, 1)}
    low = [jnp.asarray(a, dtype) if i in floats else a for i, a in enumerate(args)]
    rounded = [jnp.asarray(a, jnp.float32) if i in floats else a for i, a in enumerate(low)]
    result = fn(*low)
    assert result.dtype == jnp.float32
    # Same as float32 arithmetic on the rounded inputs: nothing is computed in low precision ...
    np.testing.assert_allclose(result, fn(*rounded), rtol=1e-6, atol=1e-6)
    # ... and within the input rounding of the float32 result.
    np.testing.assert_allclose(result, fn(*args), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_every_function_returns_float32(dtype):
    w, r = jnp.asarray(CHOSEN, dtype), jnp.asarray(REJECTED, dtype)
    results = [L.bradley_terry(w, r), L.hinge(w, r), L.smoothed_bradley_terry(w, r, 0.1), L.focal_bradley_terry(w, r),
               L.rao_kupper(w, r, OUTCOME, 0.5), L.davidson(w, r, OUTCOME, 0.5), L.centering(w, r), L.l2(w),
               L.preference_probability(w, r), L.accuracy(w, r), L.masked_mean(w),
               L.all_pairs(w, np.zeros(SHAPE, np.int32)),
               L.plackett_luce(w, np.zeros(SHAPE, np.int32))]
    assert [x.dtype for x in results] == [jnp.float32] * len(results)
    grad = jax.grad(lambda w: L.bradley_terry(w, r).sum())(w)
    assert grad.dtype == dtype


# --------------------------------------------------------------------------------------------
# Worked examples


def test_worked_example_preference_probability():
    p = L.preference_probability(2.0, -0.2)
    assert abs(float(p) - 0.9002495) < 1e-6
    assert round(float(p), 2) == 0.90


def test_worked_example_two_models():
    chosen, rejected = jnp.array([3.2, -0.5]), jnp.array([1.5, -2.0])  # model A, model B
    np.testing.assert_array_equal(L.accuracy(chosen, rejected), [1.0, 1.0])
    loss_a, loss_b = L.bradley_terry(chosen, rejected)
    np.testing.assert_allclose([loss_a, loss_b], [np.log1p(np.exp(-1.7)), np.log1p(np.exp(-1.5))], rtol=1e-6)
    assert loss_a < loss_b  # A separates the pair by 1.7, B by 1.5


def test_accuracy_counts_ties_as_wrong():
    np.testing.assert_array_equal(L.accuracy(jnp.array([1.0, 1.0, 2.0]), jnp.array([1.0, 2.0, 1.0])), [0, 0, 1])


# --------------------------------------------------------------------------------------------
# Listwise: masks and the K = 2 special case


@pytest.mark.parametrize("fn", [L.all_pairs, L.plackett_luce], ids=["all_pairs", "plackett_luce"])
def test_masked_slots_are_the_same_as_absent_slots(fn):
    rewards = np.array([1.3, np.nan, -0.4, 2.2, np.inf, 0.7], np.float32)
    ranks = np.array([2, 0, 1, 2, 0, 0], np.int32)  # ties among real slots (0 and 3) and with padding
    where = np.array([True, False, True, True, False, True])
    compact = lambda r: fn(r[None], ranks[where][None])[0]  # noqa: E731
    padded = lambda r: fn(r[None], ranks[None], where=where[None])[0]  # noqa: E731
    np.testing.assert_allclose(jax.jit(padded)(rewards), compact(rewards[where]), rtol=1e-6)
    grad = jax.jit(jax.grad(padded))(rewards)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[~where], 0.0)
    np.testing.assert_allclose(grad[where], jax.grad(compact)(rewards[where]), rtol=1e-6)


@pytest.mark.parametrize("fn", [L.all_pairs, L.plackett_luce], ids=["all_pairs", "plackett_luce"])
def test_lists_with_no_pair_give_zero_loss_and_zero_gradient(fn):
    rewards = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], np.float32)
    where = np.array([[False, False, False], [False, True, False]])
    ranks = np.array([[0, 1, 2], [0, 1, 2]], np.int32)
    loss, grad = jax.value_and_grad(lambda r: fn(r, ranks, where=where).sum())(rewards)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_all_pairs_ignores_ties_and_plackett_luce_breaks_them_by_slot():
    rewards = np.array([[0.5, 2.0, -1.0]], np.float32)
    tied = np.array([[0, 0, 1]], np.int32)
    # all_pairs: (0, 2) and (1, 2) only.
    np.testing.assert_allclose(L.all_pairs(rewards, tied),
                               [(ref_bradley_terry(0.5, -1.0) + ref_bradley_terry(2.0, -1.0)) / 2], rtol=1e-6)
    # plackett_luce: the tie is read as slot 0 before slot 1.
    np.testing.assert_allclose(L.plackett_luce(rewards, tied), L.plackett_luce(rewards, np.array([[0, 1, 2]])))
    assert not np.allclose(L.plackett_luce(rewards, tied), L.plackett_luce(rewards, np.array([[1, 0, 2]])))


def test_two_response_lists_are_bradley_terry():
    rewards = np.stack([CHOSEN.ravel(), REJECTED.ravel()], -1)
    ranks = np.tile(np.array([0, 1], np.int32), (rewards.shape[0], 1))
    expected = L.bradley_terry(CHOSEN.ravel(), REJECTED.ravel())
    np.testing.assert_allclose(L.all_pairs(rewards, ranks), expected, rtol=1e-6)
    np.testing.assert_allclose(L.plackett_luce(rewards, ranks), expected, rtol=1e-6)
    np.testing.assert_allclose(L.all_pairs(rewards[:, ::-1], ranks[:, ::-1]), expected, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Devices: masked_mean across shards; the same values under jit, vmap and pmap

DEVICES = 8
VALUES = RNG.normal(size=(DEVICES * 4,)).astype(np.float32)
# Uneven padding: device 0 has no real example, device 1 one, device 7 all four.
REAL = np.concatenate([np.arange(4) < k for k in (0, 1, 4, 2, 3, 1, 0, 4)])


def mesh(shape, names, axis_type=AxisType.Auto):
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def sharded_mean(values, where, axis_name, mesh_):
    """masked_mean of a batch sharded over ``axis_name``, as the training engine shards it."""
    spec = P(axis_name)
    values, where = jax.device_put((values, where), jax.sharding.NamedSharding(mesh_, spec))
    fn = jax.shard_map(lambda v, w: L.masked_mean(v, w, axis_name=axis_name), mesh=mesh_,
                       in_specs=(spec, spec), out_specs=P())
    return jax.jit(fn)(values, where)


def test_conftest_gives_eight_devices():
    assert jax.device_count() == DEVICES


@pytest.mark.parametrize("shape,axis_name,axis_type", [
    ((8,), "data", AxisType.Auto),
    ((4, 2), ("data", "fsdp"), AxisType.Auto),
    ((4, 2), ("data", "fsdp"), AxisType.Explicit),
])
def test_masked_mean_in_shard_map_is_the_mean_over_every_real_example(shape, axis_name, axis_type):
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    mesh_ = mesh(shape, names, axis_type)
    with jax.set_mesh(mesh_):
        value, grad = jax.value_and_grad(lambda v: sharded_mean(v, REAL, axis_name, mesh_))(VALUES)
    expected = VALUES[REAL].astype(np.float64).mean()
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6)
    # The gradient is 1/N at each real example, whichever device holds it, and 0 at padding.
    np.testing.assert_allclose(grad, REAL / REAL.sum(), rtol=1e-6)
    # The padding is uneven, so a mean of per-device means would differ.
    per_device = [v[w].mean() for v, w in zip(VALUES.reshape(8, 4), REAL.reshape(8, 4)) if w.any()]
    assert abs(np.mean(per_device) - expected) > 1e-2


def test_masked_mean_with_no_real_example_anywhere_is_zero_with_finite_gradient():
    none = np.zeros_like(REAL)
    values = np.where(REAL, VALUES, np.nan).astype(np.float32)  # padding may hold anything
    value, grad = jax.value_and_grad(lambda v: sharded_mean(v, none, "data", mesh((8,), ("data",))))(values)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_masked_mean_under_pmap_equals_shard_map():
    pmapped = jax.pmap(lambda v, w: L.masked_mean(v, w, axis_name="i"), axis_name="i")
    result = pmapped(VALUES.reshape(DEVICES, -1), REAL.reshape(DEVICES, -1))
    np.testing.assert_allclose(result, np.full(DEVICES, VALUES[REAL].mean()), rtol=1e-6)
    np.testing.assert_allclose(result[0], sharded_mean(VALUES, REAL, "data", mesh((8,), ("data",))), rtol=1e-6)


PER_PAIR = {
    "bradley_terry": lambda w, r, o: L.bradley_terry(w, r, 0.3),
    "hinge": lambda w, r, o: L.hinge(w, r),
    "smoothed_bradley_terry": lambda w, r, o: L.smoothed_bradley_terry(w, r, 0.1),
    "focal_bradley_terry": lambda w, r, o: L.focal_bradley_terry(w, r),
    "rao_kupper": lambda w, r, o: L.rao_kupper(w, r, o, 0.5),
    "davidson": lambda w, r, o: L.davidson(w, r, o, 0.5),
    "all_pairs": lambda w, r, o: L.all_pairs(jnp.stack([w, r], -1), jnp.stack([o, 1 - o], -1)),
    "plackett_luce": lambda w, r, o: L.plackett_luce(jnp.stack([w, r], -1), jnp.stack([o, 1 - o], -1)),
}


def test_same_values_under_jit_vmap_and_pmap():
    chosen, rejected = RNG.normal(size=(2, DEVICES, 5)).astype(np.float32)
    outcome = RNG.integers(-1, 2, (DEVICES, 5)).astype(np.int32)

    def everything(w, r, o):
        return {name: fn(w, r, o) for name, fn in PER_PAIR.items()}

    flat = jax.jit(everything)(chosen.ravel(), rejected.ravel(), outcome.ravel())
    flat = jax.tree.map(lambda x: x.reshape(DEVICES, 5), flat)
    chex.assert_trees_all_close(jax.vmap(everything)(chosen, rejected, outcome), flat, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(jax.pmap(everything)(chosen, rejected, outcome), flat, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Input validation


PAIRED = {
    "bradley_terry": L.bradley_terry,
    "hinge": L.hinge,
    "smoothed_bradley_terry": lambda a, b: L.smoothed_bradley_terry(a, b, 0.1),
    "focal_bradley_terry": L.focal_bradley_terry,
    "rao_kupper": lambda a, b: L.rao_kupper(a, b, np.ones(np.shape(a), np.int32), 0.5),
    "davidson": lambda a, b: L.davidson(a, b, np.ones(np.shape(a), np.int32), 0.5),
    "centering": L.centering,
    "preference_probability": L.preference_probability,
    "accuracy": L.accuracy,
}


@pytest.mark.parametrize("name", PAIRED)
def test_b_against_b_by_1_is_refused_naming_both_shapes(name):
    with pytest.raises(ValueError, match=r"\(4,\).*\(4, 1\)"):
        PAIRED[name](np.zeros(4, np.float32), np.zeros((4, 1), np.float32))
    with pytest.raises(ValueError, match=r"\(4, 1\).*\(4,\)"):
        jax.jit(PAIRED[name])(np.zeros((4, 1), np.float32), np.zeros(4, np.float32))


@pytest.mark.parametrize("name", PAIRED)
def test_integer_rewards_are_refused(name):
    with pytest.raises(TypeError, match="int32"):
        PAIRED[name](np.zeros(4, np.int32), np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="bool"):
        PAIRED[name](np.zeros(4, np.float32), np.zeros(4, bool))


@pytest.mark.parametrize("fn", [L.bradley_terry, L.hinge, L.focal_bradley_terry,
                                lambda w, r, margin: L.smoothed_bradley_terry(w, r, 0.1, margin=margin)])
@pytest.mark.parametrize("shape", [(3,), (4, 1), (1,)])
def test_margin_of_a_third_shape_is_refused(fn, shape):
    with pytest.raises(ValueError, match=rf"margin.*\(4,\).*{re.escape(str(shape))}"):
        fn(np.zeros(4, np.float32), np.zeros(4, np.float32), margin=np.zeros(shape, np.float32))


def test_options_of_the_wrong_shape_or_range_are_refused():
    w = np.zeros(4, np.float32)
    ones = np.ones(4, np.int32)
    with pytest.raises(ValueError, match="log_theta"):
        L.rao_kupper(w, w, ones, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="log_theta must be > 0"):
        L.rao_kupper(w, w, ones, 0.0)
    with pytest.raises(ValueError, match="smoothing must be in"):
        L.smoothed_bradley_terry(w, w, 1.5)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        L.focal_bradley_terry(w, w, gamma=-1.0)
    with pytest.raises(ValueError, match=r"outcome.*\(4,\).*\(4, 1\)"):
        L.davidson(w, w, ones[:, None], 0.0)
    with pytest.raises(ValueError, match=r"outcome must be \+1"):
        L.davidson(w, w, 2 * ones, 0.0)
    with pytest.raises(TypeError, match="outcome"):
        L.rao_kupper(w, w, ones.astype(bool), 0.5)
    # Traced options cannot be checked, but still work.
    assert jax.jit(L.rao_kupper)(w, w, ones, 0.5).shape == (4,)


def test_bradley_terry_reductions_are_the_mean_and_sum_of_the_pairs():
    """XLA's path (the tests' eight devices keep the C++ pass away; tests/test_pairwise_kernel.py checks that one):
    the mean and the sum against float64, their gradients the per-pair losses' reduced, bfloat16 in float32."""
    reference = ref_bradley_terry(CHOSEN.astype(np.float64), REJECTED, MARGIN)
    for reduction, want in (("mean", reference.mean()), ("sum", reference.sum())):
        value = L.bradley_terry(CHOSEN, REJECTED, margin=MARGIN, reduction=reduction)
        assert value.shape == () and value.dtype == jnp.float32
        np.testing.assert_allclose(value, want, rtol=1e-6)
        grads = jax.grad(lambda w, r: L.bradley_terry(w, r, MARGIN, reduction=reduction), (0, 1))(CHOSEN, REJECTED)
        reduce = getattr(jnp, reduction)
        per_pair = jax.grad(lambda w, r: reduce(L.bradley_terry(w, r, MARGIN)), (0, 1))(CHOSEN, REJECTED)
        for ours, theirs in zip(grads, per_pair):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6)
    low = L.bradley_terry(CHOSEN.astype(jnp.bfloat16), REJECTED.astype(jnp.bfloat16), reduction="mean")
    assert low.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"reduction must be one of \('none', 'mean', 'sum'\); got 'avg'"):
        L.bradley_terry(CHOSEN, REJECTED, reduction="avg")


def test_listwise_shapes_and_dtypes_are_checked():
    rewards = np.zeros((2, 3), np.float32)
    ranks = np.zeros((2, 3), np.int32)
    where = np.ones((2, 3), bool)
    for fn in (L.all_pairs, L.plackett_luce):
        with pytest.raises(ValueError, match=r"rewards.*\(2, 3\).*ranks.*\(2, 4\)"):
            fn(rewards, np.zeros((2, 4), np.int32))
        with pytest.raises(ValueError, match=r"rewards.*\(2, 3\).*where.*\(3,\)"):
            fn(rewards, ranks, where=np.ones(3, bool))
        with pytest.raises(TypeError, match="ranks must be integers"):
            fn(rewards, ranks.astype(np.float32), where=where)
        with pytest.raises(TypeError, match="where must be a boolean mask"):
            fn(rewards, ranks, where=where.astype(np.int32))
        with pytest.raises(TypeError, match="int32"):
            fn(ranks, ranks, where=where)
        with pytest.raises(ValueError, match=r"\[\.\.\., K\]"):
            fn(np.float32(1.0), np.int32(0))


def test_masked_mean_and_l2_arguments_are_checked():
    with pytest.raises(ValueError, match=r"values.*\(4,\).*where.*\(4, 1\)"):
        L.masked_mean(np.zeros(4, np.float32), np.ones((4, 1), bool))
    with pytest.raises(TypeError, match="boolean"):
        L.masked_mean(np.zeros(4, np.float32), np.ones(4, np.float32))
    with pytest.raises(TypeError, match="axis_name"):
        L.masked_mean(np.zeros(4, np.float32), axis_name=0)
    with pytest.raises(TypeError, match="int32"):
        L.l2(np.zeros(4, np.int32))


# --------------------------------------------------------------------------------------------
# Properties and docs

finite_rewards = st.floats(-30, 30, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None)
@given(st.lists(finite_rewards, min_size=4, max_size=4), st.permutations(range(4)), st.permutations(range(4)))
def test_listwise_losses_do_not_depend_on_slot_order(rewards, ranks, permutation):
    rewards, ranks = np.array(rewards, np.float32), np.array(ranks, np.int32)
    permutation = np.array(permutation)
    for fn in (L.all_pairs, L.plackett_luce):
        np.testing.assert_allclose(fn(rewards[permutation], ranks[permutation]), fn(rewards, ranks), rtol=1e-5,
                                   atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(finite_rewards, finite_rewards, st.floats(0.01, 3.0))
def test_tie_probabilities_sum_to_one(a, b, parameter):
    a, b = np.full(3, a, np.float32), np.full(3, b, np.float32)
    outcome = np.array([1, -1, 0], np.int32)
    for fn in (L.rao_kupper, L.davidson):
        total = np.exp(-np.asarray(fn(a, b, outcome, parameter), np.float64)).sum()
        assert abs(total - 1.0) < 1e-5
    p = L.preference_probability(a, b) + L.preference_probability(b, a)
    np.testing.assert_allclose(p, 1.0, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(finite_rewards, finite_rewards, st.floats(0.0, 1.0), st.floats(0.0, 4.0))
def test_pairwise_losses_agree_with_references_anywhere(chosen, rejected, smoothing, gamma):
    w, r = np.float32(chosen), np.float32(rejected)
    d = float(w) - float(r)
    softplus = lambda x: float(np.logaddexp(0.0, x))  # noqa: E731
    assert np.isclose(L.bradley_terry(w, r), softplus(-d), rtol=1e-5, atol=1e-5)
    assert np.isclose(L.smoothed_bradley_terry(w, r, smoothing),
                      (1 - smoothing) * softplus(-d) + smoothing * softplus(d), rtol=1e-5, atol=1e-5)
    weight = (1 - 2 * max(np.exp(-softplus(-d)) - 0.5, 0.0)) ** gamma
    assert np.isclose(L.focal_bradley_terry(w, r, gamma), weight * softplus(-d), rtol=1e-5, atol=1e-5)


def test_docstring_examples():
    results = doctest.testmod(L, raise_on_error=False)
    assert results.attempted >= 13 and results.failed == 0
