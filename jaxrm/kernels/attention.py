"""Softmax attention and its gradients fused per item on the CPU's vector units, for XLA:CPU: float32, and
bfloat16 on AVX512-BF16's dot products.

XLA:CPU (jax 0.10) runs attention's products as batched products of one item (a batch row and a key/value
head) each, at about a third of the rate of its large products (a MiniLM layer's 256 × 256 × 32 per item:
~50 GFLOP/s on two AMD EPYC Zen 3 cores, where a dense layer's product reaches ~140), and its softmax and
backward as separate passes over [B, K, Q, S] float32 tensors. ``attention.cc`` beside this module runs one
item at a time on one core, its products, softmax and backward back to back, so that the item's scores stay
in that core's cache:

    S = Q Kᵀ + bias      P = softmax(S) by rows      O = P V
    dV = Pᵀ dO    dP = dO Vᵀ    dS = P ⊙ (dP − rowsum(dO ⊙ O))    dQ = dS K    dK = dSᵀ Q

Two kernels, one contract (the AMX kernel's, `jaxrm.kernels.amx.attention`): `attention` and
`attention_backward`.

- float32: register-blocked float32 products (AVX2 + FMA where the CPU has them, else its baseline vectors).
- bfloat16, built where the CPU has `AVX512_BF16_FLAGS`: products on ``vdpbf16ps`` (two bfloat16 products
  summed into each float32 lane), P, dO and dS rounded to bfloat16 for the products that read them, as
  XLA's bfloat16 attention rounds them. It takes key counts and head sizes that are multiples of 16 and an
  even query count (`bfloat16_takes`); other bfloat16 operands are widened to float32 for the float32
  kernel. MiniLM gradient step, 16 pairs × 256 tokens, AMD EPYC Zen 4, three programs in one process: XLA's
  bfloat16 attention 2.61 s, the float32 kernel on widened operands 2.29, the bfloat16 kernel 2.13
  (Qwen3-50M: 5.68 / 5.09 / 4.70).

`jaxrm.models.layers.attention` routes here where `takes` says so: float32 or bfloat16 operands (bfloat16
where no AMX kernel takes them) whose key count and head size are multiples of 8, one mask for every head of
a batch row, JAX on its CPU backend with one device (a custom call carries no sharding rule), unless
``JAXRM_ATTENTION_KERNEL=0``; elsewhere XLA's own operations stay (also where no C++ compiler is found: one
warning).

Example:
    >>> import jax.numpy as jnp
    >>> from jaxrm.kernels import attention
    >>> query, key = jnp.ones((2, 4, 8)), jnp.ones((2, 8, 8))
    >>> bias = jnp.zeros((1, 4, 8))
    >>> out, p = attention.attention(query, key, key, bias) if attention.available() else (query, None)
    >>> out.shape
    (2, 4, 8)
"""

from __future__ import annotations

import functools
import math
import os
import platform

import jax
import jax.numpy as jnp

from jaxrm import host
from jaxrm.kernels import native

SOURCE = "attention.cc"
ATTENTION, ATTENTION_INFERENCE, ATTENTION_BACKWARD = (
    "jaxrm_attention", "jaxrm_attention_inference", "jaxrm_attention_backward")
ATTENTION_BF16, ATTENTION_BF16_INFERENCE, ATTENTION_BF16_BACKWARD = (
    "jaxrm_attention_bf16", "jaxrm_attention_bf16_inference", "jaxrm_attention_bf16_backward")
LANES = 8
"""The key count and the head size must be multiples of this (the float32 kernel's vector width)."""
BF16_LANES = 16
"""The bfloat16 kernel's: its key count and head size must be multiples of this, its query count even."""
AVX512_BF16_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})


def compile_flags(cpu_flags: frozenset[str] | None = None, machine: str | None = None) -> tuple[str, ...]:
    """The compiler's flags: `native.BASE_FLAGS`, and on an x86-64 CPU (``machine``, default `platform.machine`)
    AVX2 and FMA where its flags (``cpu_flags``, default `jaxrm.host.cpu_flags`) have them, and AVX512-BF16 (which
    builds the bfloat16 kernel) where they have `AVX512_BF16_FLAGS`. The build is cached per flags, so a machine
    of another kind builds its own.

    Example:
        >>> compile_flags(frozenset({"avx2", "fma"}), "x86_64")[-2:], compile_flags(frozenset({"sse2"}), "x86_64")[-1]
        (('-mavx2', '-mfma'), '-Wno-psabi')
        >>> compile_flags(frozenset({"avx2", "fma"}) | AVX512_BF16_FLAGS, "x86_64")[-1]
        '-mavx512bf16'
    """
    if (machine or platform.machine()) not in ("x86_64", "AMD64"):
        return native.BASE_FLAGS
    flags = host.cpu_flags() if cpu_flags is None else cpu_flags
    vector = ("-mavx2", "-mfma") if {"avx2", "fma"} <= flags else ()
    if AVX512_BF16_FLAGS <= flags:
        vector += ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")
    return (*native.BASE_FLAGS, *vector)


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA (tried once per process)."""
    if os.environ.get("JAXRM_ATTENTION_KERNEL", "1") == "0":
        return False
    targets = (ATTENTION, ATTENTION_INFERENCE, ATTENTION_BACKWARD)
    if bfloat16_built():
        targets += (ATTENTION_BF16, ATTENTION_BF16_INFERENCE, ATTENTION_BF16_BACKWARD)
    return native.load(SOURCE, compile_flags(), targets, "The fused attention kernel") is not None


@functools.cache
def bfloat16_built() -> bool:
    """Whether this machine's build has the bfloat16 kernel (AVX512-BF16); `available` says whether it loaded."""
    return "-mavx512bf16" in compile_flags()


def bfloat16_takes(query: jax.Array, key: jax.Array) -> bool:
    """Whether the bfloat16 kernel takes bfloat16 operands of these shapes (else they are widened to float32)."""
    return (bfloat16_built() and available() and key.shape[-2] % BF16_LANES == 0
            and key.shape[-1] % BF16_LANES == 0 and query.shape[-2] % 2 == 0)


def enabled() -> bool:
    """Whether jaxrm's layers route float32 attention here now (see the module docstring)."""
    return native.kernels_allowed() and jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


def takes(query: jax.Array, key: jax.Array, value: jax.Array) -> bool:
    """Whether attention over these heads-major operands ([..., Q, D], [..., S, D]) goes here now: all float32, or
    all bfloat16 (to the bfloat16 kernel where `bfloat16_takes` them, else widened to the float32 one)."""
    return (query.dtype == key.dtype == value.dtype and query.dtype in (jnp.float32, jnp.bfloat16)
            and key.shape[-2] % LANES == 0 and key.shape[-1] % LANES == 0 and enabled())


def _require() -> None:
    if not available():
        raise RuntimeError("The float32 attention kernel is not available here (no C++ compiler, or "
                           "JAXRM_ATTENTION_KERNEL=0); jaxrm's layers use XLA's operations instead")


def attention(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array, *,
              probabilities: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """Softmax attention, ``P = softmax(query keyᵀ + bias)`` by rows and ``out = P value``.

    Shapes: ``query`` [..., Q, D], ``key`` and ``value`` [..., S, D] (the same leading axes: an *item*, e.g. a
    batch row and a key/value head; S and D multiples of 8), all float32 or all bfloat16; ``bias`` float32
    [B, T, S], where the ``B`` bias rows divide the items in order (item ``i`` takes ``bias[i // (items // B)]``)
    and ``T`` divides ``Q`` (query ``r`` takes bias row ``r mod T``: the heads of a group one after another).
    Scale ``query`` beforehand. Returns ``out`` float32 [..., Q, D] and ``P`` [..., Q, S] (what
    `attention_backward` reads; None with ``probabilities=False``, for inference: P is then never written out).
    P is bfloat16 where the bfloat16 kernel ran (`bfloat16_takes`: its products read P in bfloat16), else float32
    (bfloat16 operands widened).

    Raises:
      RuntimeError: the kernel is not `available` here.
      ValueError: dtypes or shapes other than those.
    """
    _require()
    items = math.prod(query.shape[:-2])
    queries, keys = query.shape[-2], key.shape[-2]
    if not (query.dtype == key.dtype == value.dtype and query.dtype in (jnp.float32, jnp.bfloat16)
            and bias.dtype == jnp.float32) or key.shape != value.shape \
            or key.shape[:-2] != query.shape[:-2] or key.shape[-1] != query.shape[-1] or bias.ndim != 3 \
            or bias.shape[2] != keys or items % bias.shape[0] or queries % bias.shape[1] or keys == 0 \
            or keys % LANES or key.shape[-1] % LANES:
        raise ValueError(f"attention.attention: query, key, value must be float32 or bfloat16 [..., Q, D], "
                         f"[..., S, D], [..., S, D] with S and D multiples of {LANES}, and bias float32 [B, T, S] "
                         f"with B dividing the items and T dividing Q; got {query.dtype}{list(query.shape)}, "
                         f"{key.dtype}{list(key.shape)}, {value.dtype}{list(value.shape)}, "
                         f"{bias.dtype}{list(bias.shape)}.")
    if query.dtype == jnp.bfloat16 and bfloat16_takes(query, key):
        return forward_call((ATTENTION_BF16, ATTENTION_BF16_INFERENCE), jnp.bfloat16, query, key, value, bias,
                            probabilities)
    query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
    return forward_call((ATTENTION, ATTENTION_INFERENCE), jnp.float32, query, key, value, bias, probabilities)


def forward_call(targets: tuple[str, str], probabilities_dtype, query: jax.Array, key: jax.Array, value: jax.Array,
                 bias: jax.Array, probabilities: bool) -> tuple[jax.Array, jax.Array | None]:
    """The forward custom call of a fused attention kernel (this module's, or `jaxrm.kernels.amx`'s) on checked
    operands: ``targets`` (with P, without P), P in ``probabilities_dtype``; returns ``out`` and P or None."""
    items, queries, keys = math.prod(query.shape[:-2]), query.shape[-2], key.shape[-2]
    out_shape = jax.ShapeDtypeStruct((items, queries, query.shape[-1]), jnp.float32)
    operands = (native.items(query), native.items(key), native.items(value), bias)
    if not probabilities:
        return jax.ffi.ffi_call(targets[1], out_shape)(*operands).reshape(query.shape), None
    weights_shape = jax.ShapeDtypeStruct((items, queries, keys), probabilities_dtype)
    out, weights = jax.ffi.ffi_call(targets[0], (out_shape, weights_shape))(*operands)
    return out.reshape(query.shape), weights.reshape(*query.shape[:-1], keys)


def attention_backward(query: jax.Array, key: jax.Array, value: jax.Array, probabilities: jax.Array,
                       out: jax.Array, out_grad: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients of `attention` with respect to ``query``, ``key`` and ``value`` (float32), from its
    ``probabilities`` P and ``out`` O and the gradient ``out_grad`` dO of its output (float32):

        dV = Pᵀ dO    dP = dO Vᵀ    dS = P ⊙ (dP − rowsum(dO ⊙ O))    dQ = dS K    dK = dSᵀ Q

    (the bias gets dS, which nothing here needs). A bfloat16 P is the bfloat16 kernel's: its products then
    multiply bfloat16 operands (dO and dS rounded to bfloat16) with float32 accumulation; a float32 P the
    float32 kernel's (bfloat16 ``query``, ``key``, ``value`` widened).

    Raises:
      RuntimeError: the kernel is not `available` here.
      ValueError: shapes or dtypes that do not match `attention`'s.
    """
    _require()
    operands = (query, key, value, probabilities, out, out_grad)
    bfloat16 = probabilities.dtype == jnp.bfloat16  # the bfloat16 kernel's P; a float32 P, the float32 kernel's
    dtypes_match = query.dtype == key.dtype == value.dtype and out.dtype == out_grad.dtype == jnp.float32 and (
        query.dtype == jnp.bfloat16 and bfloat16_takes(query, key) if bfloat16
        else probabilities.dtype == jnp.float32 and query.dtype in (jnp.float32, jnp.bfloat16))
    if not dtypes_match or probabilities.shape != (*query.shape[:-1], key.shape[-2]) or out.shape != query.shape \
            or out_grad.shape != query.shape or key.shape != value.shape or key.shape[:-2] != query.shape[:-2] \
            or key.shape[-2] % LANES or key.shape[-1] % LANES:
        raise ValueError(f"attention.attention_backward: shapes or dtypes do not match: query "
                         f"{query.dtype}{list(query.shape)}, key {list(key.shape)}, value {list(value.shape)}, "
                         f"probabilities {probabilities.dtype}{list(probabilities.shape)}, out "
                         f"{out.dtype}{list(out.shape)}, out_grad {out_grad.dtype}{list(out_grad.shape)}.")
    if bfloat16:
        return backward_call(ATTENTION_BF16_BACKWARD, *operands)
    return backward_call(ATTENTION_BACKWARD, *(x.astype(jnp.float32) for x in operands))


def backward_call(target: str, query: jax.Array, key: jax.Array, value: jax.Array, probabilities: jax.Array,
                  out: jax.Array, out_grad: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The backward custom call ``target`` of a fused attention kernel on checked operands: float32 dQ, dK, dV."""
    f32 = lambda x: jax.ShapeDtypeStruct((math.prod(x.shape[:-2]), *x.shape[-2:]), jnp.float32)
    call = jax.ffi.ffi_call(target, (f32(query), f32(key), f32(value)))
    grads = call(*map(native.items, (query, key, value, probabilities, out, out_grad)))
    return tuple(grad.reshape(x.shape) for grad, x in zip(grads, (query, key, value)))
