"""Matrix products and attention on Intel AMX tiles for XLA:CPU: ``bf16 × bf16 → f32``, up to 4× XLA's speed.

PyTorch's oneDNN multiplies bfloat16 on the AMX tile unit at ~2.5 TFLOP/s on two Sapphire Rapids cores.
XLA:CPU (jax 0.10) reaches the tiles for some shapes only: ~1.8 TFLOP/s for a dense layer's forward
product, ~0.2 for its weight gradient (a contraction over the tokens), and attention's batched backward
products run as float32 Eigen dots. ``amx_matmul.cc`` beside this file is a small AMX kernel exposed to
XLA as an FFI custom call; this module builds it with the system C++ compiler on first use (cached under
``$JAXRM_CACHE_DIR``, default ``~/.cache/jaxrm``), registers it, and offers

    C = op(A) op(B),  op(X) = X or Xᵀ,  A and B bfloat16 matrices (or batches), C float32 (float32 accumulation)

as `matmul`, and softmax attention fused on the tiles, `attention` and `attention_backward`: one item (a
batch row and a key/value head) at a time on one core, its products, float32 softmax and backward back to
back, so that its scores never leave the core's cache and XLA runs no pass over them. `enabled` says
whether they are used: on a CPU whose flags include ``amx_bf16`` and ``amx_tile``, with JAX on its CPU
backend with one device (a custom call carries no sharding rule, so on a multi-device mesh XLA's own
products stay), unless ``JAXRM_AMX=0``. Where it is not (no AMX, no
compiler, another backend), jaxrm's layers use ``jax.lax.dot_general`` as before; a failed build is
logged once.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxrm.kernels import amx
    >>> a, b = jnp.ones((64, 32), jnp.bfloat16), jnp.ones((32, 48), jnp.bfloat16)
    >>> amx.matmul(a, b).shape if amx.enabled() else (64, 48)
    (64, 48)
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import sys

import jax
import jax.numpy as jnp

from jaxrm import host
from jaxrm.kernels import attention as fused_attention
from jaxrm.kernels import native

SOURCE = "amx_matmul.cc"
TARGET = "jaxrm_amx_matmul"
ATTENTION, ATTENTION_BACKWARD = "jaxrm_amx_attention", "jaxrm_amx_attention_backward"
ATTENTION_INFERENCE = "jaxrm_amx_attention_inference"
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-mavx512f", "-mavx512bw", "-mavx512vl",
                 "-mamx-tile", "-mamx-bf16")

log = logging.getLogger(__name__)


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether the CPU reports the AMX tile and bfloat16 units (Linux ``/proc/cpuinfo`` flags)."""
    if cpuinfo is None and (not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64")):
        return False
    return {"amx_tile", "amx_bf16"} <= host.cpu_flags(cpuinfo)


@functools.cache
def available() -> bool:
    """Whether the AMX product is built, loaded and registered with XLA (tried once per process)."""
    if os.environ.get("JAXRM_AMX", "1") == "0":
        return False
    if not cpu_has_amx():
        return False
    library = native.load(SOURCE, COMPILE_FLAGS, (TARGET, ATTENTION, ATTENTION_INFERENCE, ATTENTION_BACKWARD),
                          "AMX matrix products")
    if library is None:
        return False
    if library.jaxrm_amx_request() != 0:
        log.warning("AMX matrix products are off: Linux refused the AMX tile state (arch_prctl)")
        return False
    return True


def enabled() -> bool:
    """Whether jaxrm's layers route their bfloat16 products here now (see the module docstring)."""
    return native.kernels_allowed() and jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


xla_products = native.xla_only
"""Within it, jaxrm's layers trace XLA's own products and attention, not the kernels (`native.xla_only`)."""


def takes(*operands: jax.Array) -> bool:
    """Whether a product of these operands goes here: all bfloat16, and `enabled`."""
    return all(operand.dtype == jnp.bfloat16 for operand in operands) and enabled()


def matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """``op(a) @ op(b)`` in float32 for bfloat16 matrices, or batches of them, ``a`` and ``b``.

    Shapes: ``a`` [..., M, K] ([..., K, M] when ``transpose_a``), ``b`` [..., K, N] ([..., N, K] when
    ``transpose_b``), the same leading (batch) axes on both; returns float32 [..., M, N].

    Raises:
      RuntimeError: the kernel is not `available` here.
    """
    _require("matrix products")
    if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2] or a.dtype != jnp.bfloat16 \
            or b.dtype != jnp.bfloat16:
        raise ValueError(f"amx.matmul takes two bfloat16 matrices or batches of them with the same batch axes, got "
                         f"{a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)}.")
    m, k = a.shape[-2:][::-1] if transpose_a else a.shape[-2:]
    k_b, n = b.shape[-2:][::-1] if transpose_b else b.shape[-2:]
    if k != k_b:
        raise ValueError(f"amx.matmul: contraction sizes differ ({k} vs {k_b}) for shapes {a.shape}, {b.shape} "
                         f"with transpose_a={transpose_a}, transpose_b={transpose_b}.")
    batch = a.shape[:-2]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((math.prod(batch), m, n), jnp.float32))
    product = call(native.items(a), native.items(b), transpose_a=bool(transpose_a), transpose_b=bool(transpose_b))
    return product.reshape(*batch, m, n)


def _require(what: str) -> None:
    if not available():
        raise RuntimeError(f"AMX {what}: not available here (no AMX, no C++ compiler, or JAXRM_AMX=0); "
                           "jaxrm's layers use XLA's operations instead")


def attention(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array, *,
              probabilities: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """Softmax attention fused on the tiles: ``P = softmax(query keyᵀ + bias)`` by rows, ``out = P value``.

    Shapes: ``query`` [..., Q, D], ``key`` and ``value`` [..., S, D] (bfloat16, the same leading axes: an
    *item*, e.g. a batch row and a key/value head); ``bias`` float32 [B, T, S], where the ``B`` bias rows
    divide the items in order (item ``i`` takes ``bias[i // (items // B)]``) and ``T`` divides ``Q``
    (query ``r`` takes bias row ``r mod T``: the heads of a group one after another). Scale ``query``
    beforehand. Returns ``out`` float32 [..., Q, D] and ``P`` bfloat16 [..., Q, S] (what
    `attention_backward` reads; None with ``probabilities=False``, for inference: P is then never written
    out). Each item's scores stay in one core's cache: the products and the
    float32 softmax run back to back, and no pass over the scores is left to XLA.
    """
    _require("attention")
    items = math.prod(query.shape[:-2])
    queries, keys = query.shape[-2], key.shape[-2]
    if not (query.dtype == key.dtype == value.dtype == jnp.bfloat16 and bias.dtype == jnp.float32) \
            or key.shape != value.shape or key.shape[:-2] != query.shape[:-2] or key.shape[-1] != query.shape[-1] \
            or bias.ndim != 3 or bias.shape[2] != keys or items % bias.shape[0] or queries % bias.shape[1] or keys == 0:
        raise ValueError(f"amx.attention: query, key, value must be bfloat16 [..., Q, D], [..., S, D], [..., S, D] and "
                         f"bias float32 [B, T, S] with B dividing the items and T dividing Q; got {query.dtype}"
                         f"{list(query.shape)}, {key.dtype}{list(key.shape)}, {value.dtype}{list(value.shape)}, "
                         f"{bias.dtype}{list(bias.shape)}.")
    return fused_attention.forward_call((ATTENTION, ATTENTION_INFERENCE), jnp.bfloat16, query, key, value, bias,
                                        probabilities)


def attention_backward(query: jax.Array, key: jax.Array, value: jax.Array, probabilities: jax.Array,
                       out: jax.Array, out_grad: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients of `attention` with respect to ``query``, ``key`` and ``value`` (float32), from its
    ``probabilities`` P and ``out`` O and the gradient ``out_grad`` dO (float32) of its output:

        dV = Pᵀ dO    dP = dO Vᵀ    dS = P ⊙ (dP − rowsum(dO ⊙ O))    dQ = dS K    dK = dSᵀ Q

    (the bias gets dS, which nothing here needs). The products multiply bfloat16 operands (dO and dS
    rounded to bfloat16) with float32 accumulation.
    """
    _require("attention")
    if probabilities.shape != (*query.shape[:-1], key.shape[-2]) or out.shape != query.shape \
            or out_grad.shape != query.shape or probabilities.dtype != jnp.bfloat16:
        raise ValueError(f"amx.attention_backward: shapes do not match: query {list(query.shape)}, key "
                         f"{list(key.shape)}, probabilities {probabilities.dtype}{list(probabilities.shape)}, out "
                         f"{list(out.shape)}, out_grad {list(out_grad.shape)}.")
    return fused_attention.backward_call(ATTENTION_BACKWARD, query, key, value, probabilities,
                                         out.astype(jnp.float32), out_grad.astype(jnp.float32))
