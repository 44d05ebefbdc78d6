"""jaxrm.kernels.pairwise: the one-pass Bradley–Terry loss (alone, and with its derivatives; per pair, and summed or
averaged in the kernel) against float64 NumPy, at the branch points of its exp and far out; its derivatives of every
order against autodiff of XLA's formula; and jaxrm.losses.bradley_terry taking it (or not) where it should. Needs a C++
compiler (skipped without one)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxrm.losses as L
from jaxrm.kernels import pairwise

pytestmark = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")

CHUNK = 1 << 15  # pairs per claim in pairwise.cc
STREAM_PAIRS = 3 << 19  # from this many pairs on, pairwise.cc's AVX-512 loops stream their outputs


@pytest.fixture(autouse=True, params=["widest", "portable"])
def loop(request, monkeypatch):
    """Every test twice: with the widest loops this CPU runs (AVX-512 where it has it), and with the portable C++
    loop (pairwise.cc reads JAXRM_LOSS_KERNEL on every call)."""
    if request.param == "portable":
        monkeypatch.setenv("JAXRM_LOSS_KERNEL", "portable")
    return request.param


def _reference(delta):
    """−log σ(d) and σ(−d) in float64, the stable way."""
    d = np.asarray(delta, np.float64)
    loss = np.logaddexp(0.0, -d)
    return loss, np.exp(-np.logaddexp(0.0, d))


def _gaps():
    """Reward gaps at every branch point of the kernel (0; √2 − 1, where log1p switches its reduction; ±87,
    where e^−|d| leaves float32's normal range), tiny and huge ones, and a dense sweep."""
    special = [0.0, 1e-30, 1e-8, 1e-3, 0.34, 0.3466, 0.35, 0.5, 0.8813736, 1.0, 2.0, 16.6, 17.0, 30.0, 86.9, 87.0,
               87.1, 88.0, 103.0, 1e4, 3e38, np.inf]
    sweep = np.linspace(-100.0, 100.0, 2 * CHUNK + 7)  # three chunks, the last one ragged
    return np.concatenate([special, np.negative(special), sweep]).astype(np.float32)


def test_values_and_derivatives_match_float64_everywhere():
    d = _gaps()
    loss, d_chosen, d_rejected = jax.jit(pairwise.bradley_terry_and_derivatives)(
        jnp.asarray(d), jnp.zeros_like(d), jnp.float32(0.0))
    ref_loss, ref_sigma = _reference(d)
    # Cephes' exp and a fitted atanh: <= 3.1e-7 relative; below e^-87 the kernel's e is 0, so losses and slopes that small are 0.
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-6, atol=2e-38)
    np.testing.assert_allclose(np.asarray(d_rejected), ref_sigma, rtol=1e-6, atol=2e-38)
    np.testing.assert_array_equal(np.asarray(d_chosen), -np.asarray(d_rejected))
    at_zero = np.flatnonzero(d == 0)
    np.testing.assert_array_equal(np.asarray(d_rejected)[at_zero], 0.5)  # both branches of σ meet at ½
    np.testing.assert_array_equal(np.asarray(loss)[at_zero], np.float32(np.log(2.0)))


def test_the_gap_is_chosen_minus_rejected_minus_margin():
    rng = np.random.default_rng(0)
    chosen, rejected, margin = (rng.standard_normal(CHUNK + 3).astype(np.float32) for _ in range(3))
    loss, _, d_rejected = pairwise.bradley_terry_and_derivatives(*map(jnp.asarray, (chosen, rejected, margin)))
    ref_loss, ref_sigma = _reference(chosen.astype(np.float64) - rejected - margin)
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(d_rejected), ref_sigma, rtol=2e-6)
    one = pairwise.bradley_terry_and_derivatives(jnp.asarray(chosen), jnp.asarray(rejected), jnp.float32(0.7))
    np.testing.assert_allclose(np.asarray(one[0]), _reference(chosen.astype(np.float64) - rejected - 0.7)[0],
                               rtol=2e-6)


def test_nan_in_any_input_is_nan_in_every_output():
    values = jnp.array([0.0, 1.0, jnp.nan, 2.0, jnp.inf, -3.0])
    others = jnp.array([0.0, jnp.nan, 0.0, 0.0, jnp.inf, 0.0])
    margin = jnp.array([jnp.nan, 0.0, 0.0, 0.0, 0.0, 0.0])
    outputs = pairwise.bradley_terry_and_derivatives(values, others, margin)
    for output in outputs:
        np.testing.assert_array_equal(np.isnan(np.asarray(output)), [True, True, True, False, True, False])


def test_empty_and_tiny_arrays():
    empty = pairwise.bradley_terry_and_derivatives(jnp.zeros(0), jnp.zeros(0), jnp.float32(1.0))
    assert all(output.shape == (0,) for output in empty)
    loss = pairwise.bradley_terry_and_derivatives(jnp.ones((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1, 1)))[0]
    np.testing.assert_allclose(np.asarray(loss), [[np.log1p(np.exp(-1.0))]], rtol=1e-6)


def test_vmap_gives_each_row_its_own_margin():
    rng = np.random.default_rng(1)
    chosen, rejected = (jnp.asarray(rng.standard_normal((3, 1000)), jnp.float32) for _ in range(2))
    margins = jnp.array([0.0, 1.0, -2.5], jnp.float32)
    rows = [pairwise.bradley_terry_and_derivatives(chosen[i], rejected[i], margins[i]) for i in range(3)]
    batched = jax.vmap(pairwise.bradley_terry_and_derivatives)(chosen, rejected, margins)
    only_margins = jax.vmap(pairwise.bradley_terry_and_derivatives, in_axes=(None, None, 0))(
        chosen[0], rejected[0], margins)
    for k in range(3):
        np.testing.assert_array_equal(np.asarray(batched[k]), np.stack([np.asarray(row[k]) for row in rows]))
        np.testing.assert_array_equal(np.asarray(only_margins[k])[0], np.asarray(rows[0][k]))
    np.testing.assert_allclose(np.asarray(only_margins[0])[2],
                               _reference(np.asarray(chosen[0], np.float64) - np.asarray(rejected[0]) + 2.5)[0],
                               rtol=2e-6)


def test_the_forward_kernel_writes_the_same_losses():
    """`bradley_terry_loss` (one quotient, no σ) against float64 and against the loss of the derivatives' pass,
    with per-pair, scalar and vmapped margins; differentiated, it is the derivatives' pass."""
    d = _gaps()
    zeros = jnp.zeros_like(d)
    loss = np.asarray(jax.jit(pairwise.bradley_terry_loss)(jnp.asarray(d), zeros, jnp.float32(0.0)))
    np.testing.assert_allclose(loss, _reference(d)[0], rtol=1e-6, atol=2e-38)
    np.testing.assert_allclose(loss, np.asarray(pairwise.bradley_terry_and_derivatives(jnp.asarray(d), zeros,
                                                                                         jnp.float32(0.0))[0]),
                               rtol=1e-6, atol=2e-38)
    assert np.isnan(np.asarray(pairwise.bradley_terry_loss(jnp.array([jnp.nan, 1.0]), jnp.zeros(2), jnp.zeros(2)))[0])
    rng = np.random.default_rng(3)
    chosen, rejected = (jnp.asarray(rng.standard_normal((3, 1000)), jnp.float32) for _ in range(2))
    margins = jnp.array([0.0, 1.0, -2.5], jnp.float32)
    batched = np.asarray(jax.vmap(pairwise.bradley_terry_loss)(chosen, rejected, margins))
    np.testing.assert_allclose(batched, _reference(np.asarray(chosen, np.float64) - np.asarray(rejected)
                                                   - np.asarray(margins)[:, None])[0], rtol=2e-6)
    per_pair = jnp.broadcast_to(margins[:, None], chosen.shape)
    np.testing.assert_array_equal(np.asarray(pairwise.bradley_terry_loss(chosen, rejected, per_pair)), batched)
    slopes = jax.grad(lambda c, r: jnp.sum(pairwise.bradley_terry_loss(c, r, per_pair)), (0, 1))(chosen, rejected)
    _, d_chosen, d_rejected = pairwise.bradley_terry_and_derivatives(chosen, rejected, per_pair)
    np.testing.assert_array_equal(np.asarray(slopes[0]), np.asarray(d_chosen))
    np.testing.assert_array_equal(np.asarray(slopes[1]), np.asarray(d_rejected))
    with pytest.raises(ValueError, match="bradley_terry_loss takes float32"):
        pairwise.bradley_terry_loss(chosen, rejected, jnp.ones(2))


def test_streamed_outputs_are_the_plain_stores_values():
    """Above STREAM_PAIRS the AVX-512 loops write with non-temporal stores, from a 64-byte boundary (vmapped rows
    of 600,001 pairs start anywhere); every value is what the same pairs give in calls too small to stream."""
    rng = np.random.default_rng(4)
    chosen, rejected = (jnp.asarray(rng.standard_normal((3, 600_001)) * 4, jnp.float32) for _ in range(2))
    margins = jnp.array([0.0, 1.0, -2.5], jnp.float32)
    assert chosen.size >= STREAM_PAIRS
    mean = lambda c, r, m: pairwise.bradley_terry_reduced_and_derivatives(c, r, m, "mean")
    for function in (pairwise.bradley_terry_and_derivatives, pairwise.bradley_terry_loss, mean):
        whole = jax.vmap(function)(chosen, rejected, margins)
        for row in range(3):
            piece = function(chosen[row], rejected[row], margins[row])
            for big, small in zip(jax.tree.leaves(whole), jax.tree.leaves(piece)):
                np.testing.assert_array_equal(np.asarray(big)[row], np.asarray(small))
    flat = pairwise.bradley_terry_and_derivatives(chosen.ravel(), rejected.ravel(), jnp.float32(0.5))
    gaps = (np.asarray(chosen).ravel() - np.asarray(rejected).ravel()) - np.float32(0.5)  # d as float32 rounds it
    ref_loss, ref_sigma = _reference(gaps)
    np.testing.assert_allclose(np.asarray(flat[0]), ref_loss, rtol=1e-6, atol=2e-38)
    np.testing.assert_allclose(np.asarray(flat[2]), ref_sigma, rtol=1e-6, atol=2e-38)
    np.testing.assert_array_equal(np.asarray(flat[1]), -np.asarray(flat[2]))


def test_sums_and_means_match_float64_and_scale_the_derivatives():
    """The reduced kernels: totals within float32 rounding of float64 sums over three claims of one row (whose
    partial sums are added afterwards); derivatives exactly s times the per-pair kernel's, s = 1 or float32(1 / N)."""
    rng = np.random.default_rng(5)
    n = 2 * CHUNK + 7
    chosen, rejected = (rng.standard_normal(n).astype(np.float32) * 8 for _ in range(2))
    margin = rng.uniform(0, 2, n).astype(np.float32)
    ref_loss, _ = _reference((chosen - rejected) - margin)  # d as float32 rounds it
    _, d_chosen, d_rejected = pairwise.bradley_terry_and_derivatives(*map(jnp.asarray, (chosen, rejected, margin)))
    for reduction, expected, scale in (("sum", ref_loss.sum(), np.float32(1)), ("mean", ref_loss.mean(), np.float32(1 / n))):
        for margins in (margin, np.float32(0.5)):
            args = tuple(map(jnp.asarray, (chosen, rejected, margins)))
            want = expected if margins is margin else \
                getattr(_reference((chosen - rejected) - np.float32(0.5))[0], reduction)()
            total, slope_chosen, slope_rejected = jax.jit(pairwise.bradley_terry_reduced_and_derivatives,
                                                          static_argnums=3)(*args, reduction)
            np.testing.assert_allclose(float(total), want, rtol=1e-6)
            np.testing.assert_allclose(float(pairwise.bradley_terry_reduced(*args, reduction)), want, rtol=1e-6)
            if margins is margin:
                np.testing.assert_array_equal(np.asarray(slope_rejected), scale * np.asarray(d_rejected))
                np.testing.assert_array_equal(np.asarray(slope_chosen), scale * np.asarray(d_chosen))
    nan = pairwise.bradley_terry_reduced_and_derivatives(jnp.array([1.0, jnp.nan, 0.0]), jnp.zeros(3), jnp.zeros(3),
                                                         "mean")
    assert np.isnan(float(nan[0])) and np.isnan(np.asarray(nan[1])).tolist() == [False, True, False]
    empty = [pairwise.bradley_terry_reduced(jnp.zeros(0), jnp.zeros(0), jnp.float32(0), r) for r in ("sum", "mean")]
    assert float(empty[0]) == 0.0 and np.isnan(float(empty[1]))  # as jnp.sum and jnp.mean of nothing
    with pytest.raises(ValueError, match="reduction must be one of"):
        pairwise.bradley_terry_reduced(jnp.zeros(4), jnp.zeros(4), jnp.float32(0), "max")


def test_vmapped_sums_are_one_per_row():
    """Under vmap each row gets its own total: rows longer than a claim (in pieces) and rows far shorter (many to a
    claim), with a margin per row or per pair; each row is what a call on that row alone gives, to the bit."""
    rng = np.random.default_rng(6)
    for rows, length in ((3, CHUNK + CHUNK // 2), (5000, 7)):
        chosen, rejected = (jnp.asarray(rng.standard_normal((rows, length)) * 4, jnp.float32) for _ in range(2))
        margins = jnp.asarray(rng.uniform(0, 2, rows), jnp.float32)
        per_pair = jnp.broadcast_to(margins[:, None], chosen.shape)
        reference = _reference((np.asarray(chosen) - np.asarray(rejected)) - np.asarray(margins)[:, None])[0]
        for reduction in ("sum", "mean"):
            want = getattr(reference, reduction)(axis=1)
            for function in (pairwise.bradley_terry_reduced, pairwise.bradley_terry_reduced_and_derivatives):
                for m in (margins, per_pair):
                    batched = jax.vmap(lambda c, r, m: function(c, r, m, reduction))(chosen, rejected, m)
                    total = jax.tree.leaves(batched)[0]
                    assert total.shape == (rows,)
                    np.testing.assert_allclose(np.asarray(total), want, rtol=1e-6)
            for row in (0, rows - 1):
                alone = pairwise.bradley_terry_reduced_and_derivatives(chosen[row], rejected[row], margins[row], reduction)
                for big, small in zip(batched, alone):
                    np.testing.assert_array_equal(np.asarray(big)[row], np.asarray(small))


def _formula(chosen, rejected, margin):
    return L._bradley_terry_formula(chosen, rejected, margin)


def _kernel_loss(chosen, rejected, margin):
    return pairwise.bradley_terry_and_derivatives(chosen, rejected, margin)[0]


def test_derivatives_of_every_order_match_autodiff_of_the_formula():
    rng = np.random.default_rng(2)
    chosen, rejected = (jnp.asarray(rng.standard_normal(4096) * 3, jnp.float32) for _ in range(2))
    margin = jnp.float32(0.3)
    for argnums in (0, 1, 2):
        first = [jax.grad(lambda *x: jnp.sum(f(*x)), argnums)(chosen, rejected, margin) for f in (_kernel_loss, _formula)]
        np.testing.assert_allclose(np.asarray(first[0]), np.asarray(first[1]), rtol=2e-6, atol=1e-7)

    def second(f):  # ∂²ℓ/∂chosen² pair by pair, and the mixed ∂²ℓ/∂chosen∂margin summed
        slope = lambda c, r, m: jax.grad(lambda c: jnp.sum(f(c, r, m)))(c)
        return jax.vmap(jax.grad(lambda c, r: slope(c[None], r[None], margin)[0]))(chosen, rejected), \
            jax.grad(lambda m: jnp.sum(slope(chosen, rejected, m)))(margin)

    for ours, theirs in zip(second(_kernel_loss), second(_formula)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-7)
    d = np.asarray(chosen, np.float64) - np.asarray(rejected) - 0.3
    sigma = _reference(d)[1]
    np.testing.assert_allclose(np.asarray(second(_kernel_loss)[0]), sigma * (1 - sigma), rtol=1e-5, atol=1e-7)
    # forward mode; and the third derivative −s(1 − s)(1 − 2s), s = σ(−d), through the JVP rule of the derivatives
    tangent = jax.jvp(lambda c: _kernel_loss(c, rejected, margin), (chosen,), (jnp.ones_like(chosen),))[1]
    np.testing.assert_allclose(np.asarray(tangent), -sigma, rtol=2e-6, atol=1e-7)
    third = jax.vmap(jax.grad(jax.grad(jax.grad(lambda c: _kernel_loss(c[None], jnp.zeros(1), margin)[0]))))(chosen)
    s = _reference(np.asarray(chosen, np.float64) - 0.3)[1]
    np.testing.assert_allclose(np.asarray(third), -s * (1 - s) * (1 - 2 * s), rtol=1e-4, atol=1e-6)


def test_derivatives_of_the_mean_match_autodiff_of_the_formula():
    """jax.grad of the reduced mean (the kernel's derivatives as they are, for the cotangent 1) and of twice it (a
    cotangent that is not 1), and second derivatives through the JVP rule of the reduced derivatives, against
    autodiff of XLA's formula's mean."""
    rng = np.random.default_rng(7)
    chosen, rejected = (jnp.asarray(rng.standard_normal(4096) * 3, jnp.float32) for _ in range(2))
    margin = jnp.asarray(rng.uniform(0, 1, 4096), jnp.float32)
    ours = lambda c, r, m: 2 * pairwise.bradley_terry_reduced(c, r, m, "mean")
    theirs = lambda c, r, m: 2 * jnp.mean(_formula(c, r, m))
    for scale in (1.0, 2.0):
        grads = [jax.grad(lambda *x: f(*x) / 2 * scale, (0, 1, 2))(chosen, rejected, margin) for f in (ours, theirs)]
        for a, b in zip(*grads):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-10)
    # ∂/∂m of Σ ∂L/∂chosen: mixed second derivatives, summed; and ∂²L/∂chosen² pair by pair (a Hessian diagonal)
    mixed = [jax.grad(lambda m: jnp.sum(jax.grad(f)(chosen, rejected, m)))(margin) for f in (ours, theirs)]
    np.testing.assert_allclose(np.asarray(mixed[0]), np.asarray(mixed[1]), rtol=1e-5, atol=1e-10)
    diagonal = [jax.jvp(lambda c: jax.grad(f)(c, rejected, margin), (chosen,), (jnp.ones_like(chosen),))[1]
                for f in (ours, theirs)]
    np.testing.assert_allclose(np.asarray(diagonal[0]), np.asarray(diagonal[1]), rtol=1e-5, atol=1e-10)
    sigma = _reference(np.asarray(chosen, np.float64) - np.asarray(rejected) - np.asarray(margin))[1]
    np.testing.assert_allclose(np.asarray(diagonal[0]), 2 * sigma * (1 - sigma) / 4096, rtol=1e-5, atol=1e-10)


def test_refuses_what_it_does_not_compute():
    ones = jnp.ones(8)
    with pytest.raises(ValueError, match="float32"):
        pairwise.bradley_terry_and_derivatives(ones.astype(jnp.bfloat16), ones.astype(jnp.bfloat16), jnp.float32(0))
    with pytest.raises(ValueError, match=r"\[8\], float32\[4\]"):
        pairwise.bradley_terry_and_derivatives(ones, jnp.ones(4), jnp.float32(0))
    with pytest.raises(ValueError, match="margin"):
        pairwise.bradley_terry_and_derivatives(ones, ones, jnp.ones(2))


def test_takes_large_float32_arrays_only():
    big = (pairwise.MIN_PAIRS,)
    assert not pairwise.takes((pairwise.MIN_PAIRS - 1,), jnp.float32)
    assert not pairwise.takes(big, jnp.bfloat16)
    assert pairwise.takes(big, jnp.float32) == (jax.device_count() == 1)  # the tests' 8 devices: never


def _one_device(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**environ, **env}).stdout


LOSSES_ON_ONE_DEVICE = """
import re
import jax, jax.numpy as jnp, numpy as np
import jaxrm.losses as L
n = 100_000
k = jax.random.split(jax.random.key(0), 3)
c, r = (jax.random.normal(key, (n,)) * 4 for key in k[:2])
m = jax.random.uniform(k[2], (n,))
total = lambda c, r, m: jnp.sum(L.bradley_terry(c, r, margin=m))
mean = lambda c, r, m: L.bradley_terry(c, r, margin=m, reduction="mean")
grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))
value, (gc, gr, gm) = grads(c, r, m)
formula = lambda c, r, m: jnp.sum(L._bradley_terry_formula(c, r, m))
ref_value, (rc, rr, rm) = jax.jit(jax.value_and_grad(formula, argnums=(0, 1, 2)))(c, r, m)
np.testing.assert_allclose(value, ref_value, rtol=1e-5)
for ours, theirs in ((gc, rc), (gr, rr), (gm, rm)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=2e-6, atol=1e-7)
np.testing.assert_allclose(jax.jit(total)(c, r, m), ref_value, rtol=1e-5)
mean_grads = jax.jit(jax.value_and_grad(mean, argnums=(0, 1)))
mean_value, (mc, mr) = mean_grads(c, r, m)
np.testing.assert_allclose(mean_value, ref_value / n, rtol=1e-5)
np.testing.assert_allclose(np.asarray(mc), np.asarray(rc) / n, rtol=2e-6, atol=1e-12)
np.testing.assert_allclose(np.asarray(mr), np.asarray(rr) / n, rtol=2e-6, atol=1e-12)
np.testing.assert_allclose(L.bradley_terry(c, r, margin=m, reduction="sum"), ref_value, rtol=1e-5)
low = jax.grad(total)(c.astype(jnp.bfloat16), r.astype(jnp.bfloat16), m)
calls = lambda lowered: ",".join(re.findall(r"custom_call @(jaxrm_\\w+)", lowered.as_text())) or "none"
print("differentiated", calls(grads.lower(c, r, m)))
print("forward", calls(jax.jit(total).lower(c, r, m)))
print("small", calls(grads.lower(c[:1000], r[:1000], m[:1000])))
print("mean differentiated", calls(mean_grads.lower(c, r, m)))
print("mean forward", calls(jax.jit(mean).lower(c, r, m)))
# The gradient of the mean is the kernel's outputs as they are: no pass over the pairs after it.
entry = mean_grads.lower(c, r, m).compile().as_text().split("ENTRY")[1]
print("mean passes after the kernel", len(re.findall(r" (?:fusion|multiply|copy)\\(", entry)))
print("bfloat16", low.dtype)
"""


def test_losses_take_the_kernel_for_gradients_on_one_device():
    lines = _one_device(LOSSES_ON_ONE_DEVICE).split("\n")
    assert lines[:7] == ["differentiated jaxrm_bradley_terry", "forward jaxrm_bradley_terry_loss", "small none",
                         "mean differentiated jaxrm_bradley_terry_sum", "mean forward jaxrm_bradley_terry_sum_loss",
                         "mean passes after the kernel 0", "bfloat16 bfloat16"]


def test_jaxrm_loss_kernel_0_turns_it_off():
    code = "from jaxrm.kernels import pairwise; print(pairwise.available(), pairwise.takes((10**6,), 'float32'))"
    assert _one_device(code, JAXRM_LOSS_KERNEL="0").split() == ["False", "False"]
    assert _one_device(code).split() == ["True", "True"]


def test_docstring_examples():
    import doctest

    from jaxrm.kernels import native

    for module in (pairwise, native):
        assert doctest.testmod(module, raise_on_error=False).failed == 0, module.__name__
