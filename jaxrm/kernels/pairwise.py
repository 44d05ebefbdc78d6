"""The Bradley–Terry loss and its derivatives in one pass over the pairs, for large float32 arrays on XLA:CPU.

For N pairs, d = r_w − r_l − m and

    ℓ = −log σ(d) = max(−d, 0) + log1p(e^{−|d|}),    ∂ℓ/∂r_w = −σ(−d),    ∂ℓ/∂r_l = ∂ℓ/∂m = σ(−d).

XLA:CPU (jax 0.10) evaluates ``value_and_grad`` of that as five passes over the pairs, the exp and log1p
inside a single-threaded reduction: 23 ms at N = 10⁷, where the memory allows ~7. ``pairwise.cc``
beside this module computes the loss and both derivatives in one vectorised, multi-threaded sweep that reads
each input once and writes each output once (`native` builds it on first use): in blocks of pairs that stay
in L1, two short loops (d and e^{−|d|}, then the outputs), whose dependency chains the CPU overlaps where
one long loop would stall on its own; large outputs (from 4 million pairs, 1.5 million with AVX-512) are
written with non-temporal stores, which skip reading every output line into the cache first. On a CPU
with AVX-512 the sweep runs from intrinsics (set ``JAXRM_LOSS_KERNEL=portable`` for the plain C++ loops).
:func:`bradley_terry_and_derivatives` returns the three, and is itself differentiable to any order (the
derivatives of the derivatives are written in JAX from them: σ′ = σ(1 − σ)). :func:`bradley_terry_loss`
is the forward pass alone (the loss, nothing else written), differentiated through the former.
``value_and_grad`` of the sum takes 0.74 ms at N = 10⁶ and 9.5 ms at 10⁷ on an AMD EPYC Zen 3 (two cores,
AVX2; 1.02 and 10.7 ms with one loop), 7.6–8.2 ms at 10⁷ on a Zen 4 (two cores, AVX-512).

A loss that is only summed or averaged need not be written at all: :func:`bradley_terry_reduced` (the sum
or the mean; float64 partial sums, added in a fixed order) and, differentiated,
:func:`bradley_terry_reduced_and_derivatives` (that total and s·∂ℓ/∂r, s = 1 or 1/N: already the gradient
for the cotangent 1 that ``jax.grad`` starts from). ``value_and_grad`` of the mean then reads the three
inputs and writes the two gradients, 200 MB at N = 10⁷, where the per-pair losses summed in XLA also write
and read the losses (280 MB): 5.0–6.8 ms on the Zen 4, against 6.8–7.7 for the per-pair losses summed, and
4.1–4.4 ms for the bare memory traffic (C++, three arrays read and two written, nothing computed).

`jaxrm.losses.bradley_terry` is `bradley_terry_loss` (with a ``reduction``, `bradley_terry_reduced`) where
`takes` says so: float32 arrays of at least `MIN_PAIRS` pairs, with JAX on its CPU backend and one device
(a custom call carries no sharding rule), unless ``JAXRM_LOSS_KERNEL=0``. Smaller arrays (a training batch)
stay with XLA, which fuses the loss into the surrounding step; so does everything where no C++ compiler is
found (one warning).

Example:
    >>> import jax.numpy as jnp
    >>> from jaxrm.kernels import pairwise
    >>> chosen, rejected = jnp.array([3.2, -0.5, 0.0]), jnp.array([1.5, -2.0, 1.0])
    >>> if pairwise.available():
    ...     loss, d_chosen, d_rejected = pairwise.bradley_terry_and_derivatives(chosen, rejected, jnp.float32(0))
    ...     with jnp.printoptions(precision=4): print(loss, d_rejected)
    ... else: print("[0.1678 0.2014 1.3133] [0.1545 0.1824 0.7311]")
    [0.1678 0.2014 1.3133] [0.1545 0.1824 0.7311]
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp

from jaxrm.kernels import native

SOURCE = "pairwise.cc"
TARGET = "jaxrm_bradley_terry"
LOSS_TARGET = "jaxrm_bradley_terry_loss"
REDUCED_TARGET = "jaxrm_bradley_terry_sum"
REDUCED_LOSS_TARGET = "jaxrm_bradley_terry_sum_loss"
REDUCTIONS = ("sum", "mean")
FLAGS = (*native.BASE_FLAGS, "-fno-trapping-math")
"""``-fno-trapping-math``: the loop's selects between computed values (``e = a >= 87 ? 0 : exp(−a)``) are control
flow to a compiler that must keep floating-point exceptions where the source raises them, and only AVX-512's
masked instructions let it vectorise that; without the flag the AVX2 and baseline clones are scalar (13–20
against 1.3 ns per pair on an AMD EPYC Zen 3). Results are unchanged: IEEE arithmetic, NaN and infinity as
before; only the exception flags differ."""
MIN_PAIRS = 1 << 14
"""Below this many pairs the loss stays in XLA's fused code: ``value_and_grad`` of a sum at 4,096 pairs
takes 0.07 ms there and 0.09 ms through the kernel; at 16,384, 0.09 ms there and 0.05 ms here (the sum alone:
0.054 ms there, 0.042 ms here)."""


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA (tried once per process)."""
    if os.environ.get("JAXRM_LOSS_KERNEL", "1") == "0":
        return False
    return native.load(SOURCE, FLAGS, (TARGET, LOSS_TARGET, REDUCED_TARGET, REDUCED_LOSS_TARGET),
                       "The Bradley-Terry loss kernel") is not None


def takes(shape: tuple[int, ...], dtype) -> bool:
    """Whether `jaxrm.losses.bradley_terry` routes pairs of this shape and compute dtype here now."""
    return (jnp.dtype(dtype) == jnp.float32 and math.prod(shape) >= MIN_PAIRS and jax.default_backend() == "cpu"
            and jax.device_count() == 1 and available())


def _check(chosen: jax.Array, rejected: jax.Array, margin: jax.Array, name: str) -> None:
    if not available():
        raise RuntimeError(f"pairwise.{name}: the kernel is not available here (no C++ "
                           "compiler, or JAXRM_LOSS_KERNEL=0); jaxrm.losses uses XLA's operations instead")
    if not (chosen.dtype == rejected.dtype == margin.dtype == jnp.float32) or chosen.shape != rejected.shape \
            or margin.shape not in ((), chosen.shape):
        raise ValueError(f"pairwise.{name} takes float32 chosen and rejected rewards of one "
                         f"shape and a float32 margin, a scalar or of that shape; got {chosen.dtype}"
                         f"{list(chosen.shape)}, {rejected.dtype}{list(rejected.shape)} and {margin.dtype}"
                         f"{list(margin.shape)}.")


@jax.custom_jvp
def bradley_terry_and_derivatives(chosen: jax.Array, rejected: jax.Array,
                                  margin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ℓ = −log σ(d), ∂ℓ/∂chosen = −σ(−d) and ∂ℓ/∂rejected = σ(−d) of each pair, d = chosen − rejected − margin,
    from one kernel pass (float32; ∂ℓ/∂margin is ∂ℓ/∂rejected).

    Args:
      chosen, rejected: float32 rewards of one shape.
      margin: float32, a scalar or of the rewards' shape.

    Raises:
      RuntimeError: the kernel is not `available` here.
      ValueError: shapes or dtypes other than those.
    """
    _check(chosen, rejected, margin, "bradley_terry_and_derivatives")
    # Under vmap every operand gains the batch axis; the kernel reads a margin of m elements as one per
    # run of N / m consecutive pairs: each batch row's scalar margin, or one per pair.
    like = jax.ShapeDtypeStruct(chosen.shape, jnp.float32)
    call = jax.ffi.ffi_call(TARGET, (like, like, like), vmap_method="broadcast_all")
    return tuple(call(chosen, rejected, margin.reshape(margin.shape or (1,))))


@bradley_terry_and_derivatives.defjvp
def _bradley_terry_and_derivatives_jvp(primals, tangents):
    loss, d_chosen, d_rejected = bradley_terry_and_derivatives(*primals)
    chosen_dot, rejected_dot, margin_dot = tangents
    # ∂ℓ/∂d = −σ(−d) = d_chosen, and σ′ = σ(1 − σ): ∂²ℓ/∂d² = σ(−d) σ(d) = d_rejected (1 − d_rejected).
    delta_dot = chosen_dot - rejected_dot - margin_dot
    curvature = d_rejected * (1 - d_rejected) * delta_dot
    return (loss, d_chosen, d_rejected), (d_chosen * delta_dot, curvature, -curvature)


@jax.custom_jvp
def bradley_terry_loss(chosen: jax.Array, rejected: jax.Array, margin: jax.Array) -> jax.Array:
    """ℓ = −log σ(d) of each pair, d = chosen − rejected − margin, from one kernel pass that writes nothing else
    (a forward pass; differentiated, it is `bradley_terry_and_derivatives`).

    Args and Raises: as `bradley_terry_and_derivatives`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> chosen, rejected = jnp.array([3.2, -0.5, 0.0]), jnp.array([1.5, -2.0, 1.0])
        >>> if available():
        ...     total = lambda c: jnp.sum(bradley_terry_loss(c, rejected, jnp.float32(0)))
        ...     with jnp.printoptions(precision=4): print(bradley_terry_loss(chosen, rejected, jnp.float32(0)),
        ...                                                jax.grad(total)(chosen))
        ... else: print("[0.1678 0.2014 1.3133] [-0.1545 -0.1824 -0.7311]")
        [0.1678 0.2014 1.3133] [-0.1545 -0.1824 -0.7311]
    """
    _check(chosen, rejected, margin, "bradley_terry_loss")
    like = jax.ShapeDtypeStruct(chosen.shape, jnp.float32)
    return jax.ffi.ffi_call(LOSS_TARGET, like, vmap_method="broadcast_all")(
        chosen, rejected, margin.reshape(margin.shape or (1,)))


@bradley_terry_loss.defjvp
def _bradley_terry_loss_jvp(primals, tangents):
    loss, d_chosen, d_rejected = bradley_terry_and_derivatives(*primals)
    chosen_dot, rejected_dot, margin_dot = tangents
    # d_rejected for both: one product when both are differentiated, and none for a constant cotangent (a sum).
    return loss, d_chosen * chosen_dot + d_rejected * (rejected_dot + margin_dot)


def _check_reduction(reduction: str, name: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"pairwise.{name}: reduction must be one of {REDUCTIONS}; got {reduction!r}")


def _scale(reduction: str, pairs: int) -> float:
    """The factor the kernel applies to the sum and its derivatives: 1, or 1 / N for a mean."""
    return 1.0 if reduction == "sum" else 1.0 / pairs


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def bradley_terry_reduced_and_derivatives(chosen: jax.Array, rejected: jax.Array, margin: jax.Array,
                                          reduction: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """L = s Σᵢ ℓᵢ over all pairs (s = 1 for ``"sum"``, 1/N for ``"mean"``), ∂L/∂chosen = −s σ(−d) and
    ∂L/∂rejected = s σ(−d), from one kernel pass that writes no per-pair loss (∂L/∂margin is ∂L/∂rejected).

    The sum runs in float64 within each claim of pairs, and the claims' partial sums are added in a fixed
    order, so a call gives the same total every time. Under vmap each batch row gets its own total.

    Args: as `bradley_terry_and_derivatives`, and ``reduction``, ``"sum"`` or ``"mean"``.

    Raises: as `bradley_terry_and_derivatives`, and ValueError for another reduction.
    """
    _check(chosen, rejected, margin, "bradley_terry_reduced_and_derivatives")
    _check_reduction(reduction, "bradley_terry_reduced_and_derivatives")
    like = jax.ShapeDtypeStruct(chosen.shape, jnp.float32)
    call = jax.ffi.ffi_call(REDUCED_TARGET, (jax.ShapeDtypeStruct((), jnp.float32), like, like),
                            vmap_method="broadcast_all")
    return tuple(call(chosen, rejected, margin.reshape(margin.shape or (1,)), mean=reduction == "mean"))


@bradley_terry_reduced_and_derivatives.defjvp
def _bradley_terry_reduced_and_derivatives_jvp(reduction, primals, tangents):
    total, d_chosen, d_rejected = bradley_terry_reduced_and_derivatives(*primals, reduction)
    chosen_dot, rejected_dot, margin_dot = tangents
    delta_dot = chosen_dot - rejected_dot - margin_dot
    # d_rejected = s σ(−d), and ∂σ(−d)/∂d = −σ(−d) σ(d): ∂d_chosen/∂d = s σ(−d) (1 − σ(−d)).
    curvature = d_rejected * (1 - d_rejected / _scale(reduction, primals[0].size)) * delta_dot
    return (total, d_chosen, d_rejected), (jnp.sum(d_chosen * delta_dot), curvature, -curvature)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def bradley_terry_reduced(chosen: jax.Array, rejected: jax.Array, margin: jax.Array, reduction: str) -> jax.Array:
    """The sum or the mean of ℓ = −log σ(chosen − rejected − margin) over all pairs, from one kernel pass that
    reads the rewards and writes nothing else (a forward pass); differentiated, it is
    `bradley_terry_reduced_and_derivatives`, whose gradient (for a cotangent of 1, as in ``jax.grad`` of this
    value) is the kernel's derivatives as they are: one pass that reads each input once and writes each
    gradient once, where the per-pair loss then summed also writes and reads the losses.

    Args and Raises: as `bradley_terry_reduced_and_derivatives`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> chosen, rejected = jnp.array([3.2, -0.5, 0.0]), jnp.array([1.5, -2.0, 1.0])
        >>> if available():
        ...     mean = lambda c: bradley_terry_reduced(c, rejected, jnp.float32(0), "mean")
        ...     with jnp.printoptions(precision=4): print(f"{mean(chosen):.4f}", jax.grad(mean)(chosen))
        ... else: print("0.5608 [-0.0515 -0.0608 -0.2437]")
        0.5608 [-0.0515 -0.0608 -0.2437]
    """
    _check(chosen, rejected, margin, "bradley_terry_reduced")
    _check_reduction(reduction, "bradley_terry_reduced")
    call = jax.ffi.ffi_call(REDUCED_LOSS_TARGET, jax.ShapeDtypeStruct((), jnp.float32), vmap_method="broadcast_all")
    return call(chosen, rejected, margin.reshape(margin.shape or (1,)), mean=reduction == "mean")


@bradley_terry_reduced.defjvp
def _bradley_terry_reduced_jvp(reduction, primals, tangents):
    total, d_chosen, d_rejected = bradley_terry_reduced_and_derivatives(*primals, reduction)
    chosen_dot, rejected_dot, margin_dot = tangents
    return total, jnp.sum(d_chosen * chosen_dot + d_rejected * (rejected_dot + margin_dot))
