"""Building blocks shared by the backbones: a dense layer and attention in mixed precision.

Both take a compute ``dtype``. In float32 they are the textbook operations. In a lower precision
(bfloat16, float16) every matrix product -- forward and both backward products -- multiplies operands
in ``dtype`` and accumulates and returns float32:

    y = dot(x.astype(dtype), W.astype(dtype))              (float32 accumulation and result)
    dx = dot(dy.astype(dtype), W.astype(dtype)ᵀ)           dW = dot(x.astype(dtype)ᵀ, dy.astype(dtype))

This is what PyTorch autocast and TPU matrix units do, and it is what makes bfloat16 fast on CPUs with
bfloat16 dot-product instructions (AVX512-BF16, AMX): XLA's ``bf16 × bf16 → f32`` products run at about
twice the float32 rate there, while ``bf16 × bf16 → bf16`` products do not. Left to itself, JAX's
transpose of a mixed-precision product would run the backward products in float32, hence the
`jax.custom_vjp` here. Parameter gradients are accumulated in float32 and returned in the parameter
dtype; everything outside the products (norms, activations, softmax statistics) stays float32.

On a CPU with AMX tiles and one JAX device, every bfloat16 product here runs on `jaxrm.kernels.amx` (the
same operands, the same float32 accumulation) instead of XLA's dot, which reaches a fraction of the tile
unit's rate: the dense layers' three, and attention as one fused kernel (its six products with the softmax
and its backward between them) when one mask serves every head of a row; elsewhere ``jax.lax.dot_general``.
Elsewhere on one CPU device, attention with one mask for every head of a row runs as the same fused kernel
on the CPU's vector units (`jaxrm.kernels.attention`: XLA runs attention's small batched products at a third
of its large products' rate), in bfloat16 on AVX512-BF16's dot products, else in float32 (bfloat16 operands
widened).

Attention saves its softmax probabilities P for the backward pass and uses the identity
rowsum(dP ⊙ P) = rowsum(dO ⊙ O) (Dao et al., 2022), so the backward reads P once and never forms the
softmax Jacobian:

    S = scale · Q Kᵀ + bias          P = softmax(S)          O = P V
    dV = Pᵀ dO    dP = dO Vᵀ    dS = P ⊙ (dP − rowsum(dO ⊙ O))    dQ = scale · dS K    dK = scale · dSᵀ Q

Example:
    >>> import jax.numpy as jnp
    >>> x, w = jnp.ones((2, 3)), jnp.full((3, 4), 0.5)
    >>> matmul(x, w, jnp.bfloat16)
    Array([[1.5, 1.5, 1.5, 1.5],
           [1.5, 1.5, 1.5, 1.5]], dtype=float32)
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrm import host
from jaxrm.kernels import amx
from jaxrm.kernels import attention as attention_kernel


def logical_axes(*names: str | None) -> dict:
    """Metadata naming a parameter's logical axes for the training engine's sharding rules
    (`jaxrm.train.mesh`); placement happens there, not at initialisation."""
    return {"out_sharding": names, "eager_sharding": False}


#: CPU flags (`jaxrm.host.cpu_flags`) of bfloat16 dot-product instructions: x86's AVX512-BF16 and AMX, Arm's BF16.
BFLOAT16_PRODUCT_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def auto_compute_dtype(backend: str | None = None, flags: frozenset[str] | None = None) -> str:
    """The compute dtype that ``model.dtype: auto`` stands for here: ``bfloat16`` where matrix products have
    bfloat16 units -- a TPU or GPU, or a CPU reporting one of `BFLOAT16_PRODUCT_FLAGS` -- else ``float32``.

    Without those instructions XLA:CPU widens bfloat16 operands to float32 and multiplies at the float32 rate,
    so the conversions only add time: on an AMD EPYC (Zen 3, AVX2) the MiniLM train step at 16 pairs × 256
    tokens takes 8.9 s with bfloat16 products and 7.1 s in float32.

    Args:
      backend: JAX's backend (default `jax.default_backend`).
      flags: the CPU's flags (default `jaxrm.host.cpu_flags`), read only on the CPU backend.

    Example:
        >>> auto_compute_dtype("cpu", frozenset({"avx2", "fma"})), auto_compute_dtype("cpu", frozenset({"avx512_bf16"}))
        ('float32', 'bfloat16')
        >>> auto_compute_dtype("tpu")
        'bfloat16'
    """
    if (backend or jax.default_backend()) != "cpu":
        return "bfloat16"
    return "bfloat16" if BFLOAT16_PRODUCT_FLAGS & (host.cpu_flags() if flags is None else flags) else "float32"


#: Added to the scores of masked keys. Finite, so a query with no allowed key attends uniformly.
MASKED_SCORE = -1e30


# Packed rows. A row of ``segment_ids`` [R, T] holds several sequences side by side: 0 marks padding and
# j ≥ 1 the j-th sequence of the row, each a contiguous run of tokens. A 0/1 padding mask is the case of one
# sequence per row (left or right padded). Sequences never see each other (a block-diagonal mask) and count
# their positions from 0, so a packed row computes what one padded row per sequence would.


def positions_in_segment(segment_ids: jax.Array) -> jax.Array:
    """Each token's index within its run of equal segment ids, int [R, T] (``index − start of the run``)."""
    segment_ids = jnp.asarray(segment_ids)
    index = jnp.arange(segment_ids.shape[-1])
    first = jnp.ones_like(segment_ids[..., :1], dtype=bool)
    starts = jnp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)


def segment_mask(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """Boolean [R, 1, Q, S]: a query reads the real keys of its own sequence; a padding query (segment 0)
    reads every real key of its row (what a padding mask alone gives, so one-sequence rows are unchanged)."""
    query = jnp.asarray(query_segments)[:, :, None]
    key = jnp.asarray(key_segments)[:, None, :]
    return ((key != 0) & ((query == key) | (query == 0)))[:, None]


def _accumulate(lhs: jax.Array, rhs: jax.Array, contracting: tuple[tuple[int, ...], tuple[int, ...]]) -> jax.Array:
    if amx.takes(lhs, rhs):
        product = _amx_product(lhs, rhs, contracting)
        if product is not None:
            return product
    return jax.lax.dot_general(lhs, rhs, (contracting, ((), ())), preferred_element_type=jnp.float32)


def _amx_product(lhs, rhs, contracting):
    """The dense layer's three products as AMX matrix products (`jaxrm.kernels.amx`), or None for others:
    ``x [..., i] · W [i, o]`` (forward), ``dy [..., o] · W [i, o]ᵀ`` (input gradient) and
    ``x [..., i]ᵀ · dy [..., o]`` over every leading axis (kernel gradient)."""
    (lhs_axes, rhs_axes), last = contracting, lhs.ndim - 1
    if rhs.ndim == 2 and lhs_axes == (last,) and rhs_axes in ((0,), (1,)):
        flat = amx.matmul(lhs.reshape(-1, lhs.shape[-1]), rhs, transpose_b=rhs_axes == (1,))
        return flat.reshape(*lhs.shape[:-1], flat.shape[-1])
    leading = tuple(range(last))
    if lhs.ndim == rhs.ndim and lhs.ndim >= 2 and lhs_axes == rhs_axes == leading:
        return amx.matmul(lhs.reshape(-1, lhs.shape[-1]), rhs.reshape(-1, rhs.shape[-1]), transpose_a=True)
    return None


def matmul(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` with operands in ``dtype``; returns float32 [..., out]."""
    if jnp.dtype(dtype) == jnp.float32:
        return _accumulate(x.astype(jnp.float32), kernel.astype(jnp.float32), ((x.ndim - 1,), (0,)))
    return _mixed_matmul(x.astype(dtype), kernel, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    return _accumulate(x, kernel.astype(dtype), ((x.ndim - 1,), (0,)))


def _mixed_matmul_forward(x, kernel, dtype):
    return _mixed_matmul(x, kernel, dtype), (x, kernel)


def _mixed_matmul_backward(dtype, residuals, output_grad):
    x, kernel = residuals
    output_grad = output_grad.astype(dtype)
    x_grad = _accumulate(output_grad, kernel.astype(dtype), ((output_grad.ndim - 1,), (1,)))
    leading = tuple(range(x.ndim - 1))
    kernel_grad = _accumulate(x, output_grad, (leading, leading))
    return x_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


_mixed_matmul.defvjp(_mixed_matmul_forward, _mixed_matmul_backward)


class Dense(nnx.Module):
    """``y = x W + b`` with ``W`` [in, out] (``kernel``) and ``b`` [out] (``bias``), computed by `matmul`;
    returns float32 (the accumulation dtype).

    Args:
      in_features, out_features: sizes of the last axis of the input and the output.
      axes: logical axis names of the kernel (the bias takes the last one).
      use_bias: whether there is a bias.
      dtype: compute dtype of the product's operands.
      param_dtype: dtype the parameters are stored in.
      init_scale: standard deviation of the normal kernel initialisation (the bias starts at zero).
    """

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
                 use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32, init_scale: float = 0.02,
                 rngs: nnx.Rngs):
        kernel = init_scale * jax.random.normal(rngs.params(), (in_features, out_features), param_dtype)
        self.kernel = nnx.Param(kernel, **logical_axes(*axes))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), **logical_axes(axes[-1])) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense_together(x, self)[0]


def dense_together(x: jax.Array, *layers: Dense) -> list[jax.Array]:
    """``[layer(x) for layer in layers]`` as one matrix product with the kernels side by side (e.g. query,
    key and value): one larger product runs closer to the machine's peak than several small ones, in the
    forward pass and in both backward products. The layers must share input size and compute dtype."""
    kernels = [layer.kernel[...] for layer in layers]
    out = matmul(x, kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=-1), layers[0].dtype)
    widths = [layer.kernel.shape[-1] for layer in layers]
    parts = jnp.split(out, list(itertools.accumulate(widths))[:-1], axis=-1)
    return [part if layer.bias is None else part + layer.bias[...].astype(jnp.float32)
            for part, layer in zip(parts, layers)]


def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array | None, *, eps: float, dtype, center: bool = True
              ) -> jax.Array:
    """LayerNorm (``center``) or RMSNorm of ``x`` over its last axis, as transformers computes them: the
    statistics in float32, the normalised values cast to ``dtype``, then scaled (and shifted) in ``dtype``:

        n = (x − μ) · r,  r = 1 / sqrt(mean((x − μ)²) + eps)   (RMSNorm: μ = 0)      y = n γ + β

    The backward pass is written out in float32 (`jax.custom_vjp`), with dn = dy γ:

        dx = r · (dn − mean(dn) − n · mean(dn ⊙ n))   (RMSNorm: without mean(dn))
        dγ = Σ_rows dy ⊙ n       dβ = Σ_rows dy      (n as rounded to ``dtype`` in the forward pass)

    Left to autodiff, dγ and dβ are sums over every token in ``dtype``, which XLA:CPU runs as a strided
    tree of bfloat16 partial sums, rounded on the way: a MiniLM LayerNorm's forward and backward at 5,120
    tokens took 14.6 ms that way, 6.6 ms written out.
    """
    return _normalize(x, scale, bias, eps, jnp.dtype(dtype), center)


def _normalized(x, eps, center):
    """``(n, r)`` in float32 (see `normalize`)."""
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True) if center else x32
    rsqrt = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return centred * rsqrt, rsqrt


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _normalize(x, scale, bias, eps, dtype, center):
    out = _normalized(x, eps, center)[0].astype(dtype) * scale.astype(dtype)
    return out if bias is None else out + bias.astype(dtype)


def _normalize_forward(x, scale, bias, eps, dtype, center):
    return _normalize(x, scale, bias, eps, dtype, center), (x, scale, bias)


def _normalize_backward(eps, dtype, center, residuals, out_grad):
    x, scale, bias = residuals
    normed, rsqrt = _normalized(x, eps, center)
    out_grad = out_grad.astype(jnp.float32)
    normed_grad = out_grad * scale.astype(dtype).astype(jnp.float32)
    correction = normed * jnp.mean(normed_grad * normed, axis=-1, keepdims=True)
    if center:
        correction = correction + jnp.mean(normed_grad, axis=-1, keepdims=True)
    x_grad = rsqrt * (normed_grad - correction)
    rows = lambda a: a.reshape(-1, a.shape[-1])
    scale_grad = jnp.sum(rows(out_grad * normed.astype(dtype).astype(jnp.float32)), axis=0)
    bias_grad = None if bias is None else jnp.sum(rows(out_grad), axis=0).astype(bias.dtype)
    return x_grad.astype(x.dtype), scale_grad.astype(scale.dtype), bias_grad


_normalize.defvjp(_normalize_forward, _normalize_backward)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array, *, scale: float,
              dtype=jnp.float32) -> jax.Array:
    """Softmax attention of ``query`` [B, T, N, D] over ``key``/``value`` [B, S, K, D]; returns float32 [B, T, N, D].

    ``N`` is a multiple of ``K`` (grouped-query attention: query head ``h`` reads key/value head
    ``h // (N // K)``). ``mask`` is boolean, broadcastable to [B, N, T, S], True where a query may read a
    key; a query with no allowed key attends uniformly. Products run in ``dtype`` with float32
    accumulation; the softmax is float32. Same result as ``jax.nn.dot_product_attention``.

    The products run heads-major: queries as [B, K, G·T, D] (the G query heads that share a key/value
    head one after another, already multiplied by ``scale``), keys and values as [B, K, S, D]. Every
    product is then a plain batched matrix product over (B, K), which XLA:CPU runs without the layout
    copies a [B, T, K, G, D] formulation needs around each product (~15 % of attention's time).
    """
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = heads // kv_heads
    if groups * kv_heads != heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} key/value heads.")
    mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, (batch, 1, 1, key.shape[1])))
    bias = jnp.where(mask, 0.0, MASKED_SCORE).astype(jnp.float32)
    if bias.shape[1] == heads:
        bias = bias.reshape(bias.shape[0], kv_heads, groups, *bias.shape[2:])
    else:
        bias = bias[:, :, None]  # [B, 1, 1, T|1, S]
    heads_major = lambda x: x.transpose(0, 2, 1, 3).astype(dtype)  # [B, S, K, D] → [B, K, S, D]
    scaled = (query.astype(jnp.float32) * scale).reshape(batch, length, kv_heads, groups, head_dim)
    scaled = scaled.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, groups * length, head_dim).astype(dtype)
    key, value = heads_major(key), heads_major(value)
    if bias.shape[1] == bias.shape[2] == 1 and (amx.takes(scaled, key, value)
                                                or attention_kernel.takes(scaled, key, value)):
        # One mask for every head of a batch row: fused per item, bias [B, T, S] (`_fused_kernel`).
        bias = jnp.broadcast_to(bias[:, 0, 0], (batch, length, key.shape[2]))
        out = _fused_attention(scaled, key, value, bias)
    else:
        out = _heads_major_attention(scaled, key, value, bias, groups, jnp.dtype(dtype))
    return out.reshape(batch, kv_heads, groups, length, head_dim).transpose(0, 3, 1, 2, 4).reshape(query.shape)


def _batch_matmul(lhs: jax.Array, rhs: jax.Array, transpose_lhs: bool = False, transpose_rhs: bool = False) -> jax.Array:
    """``op(lhs) @ op(rhs)`` over the last two axes of [B, K, ·, ·] operands, accumulated and returned in float32
    (``op`` transposes those two axes when asked)."""
    if amx.takes(lhs, rhs):
        return amx.matmul(lhs, rhs, transpose_a=transpose_lhs, transpose_b=transpose_rhs)
    if transpose_lhs and jax.default_backend() == "cpu":
        # XLA:CPU's YNNPACK products do not take a contraction over the lhs's rows (Pᵀ dO, dSᵀ Q): XLA runs
        # those as float32 Eigen dots on converted operands, several times slower per FLOP. (op(rhs)ᵀ lhs)ᵀ
        # is the same product in the form YNNPACK takes, for two small transposes ([B, K, ·, D]); the
        # barriers keep XLA's simplifier from folding them back into the product. MiniLM gradient step,
        # 16 pairs × 256, AMD EPYC Zen 4, old and new side by side: CPU time −5 to −10 %, wall time −4 to
        # −11 % in three of four A/B runs (+7 % in one, on a noisy host); float32 4.36 → 4.19 s.
        flipped = rhs if transpose_rhs else jax.lax.optimization_barrier(jnp.swapaxes(rhs, 2, 3))
        return jnp.swapaxes(jax.lax.optimization_barrier(_batch_matmul(flipped, lhs)), 2, 3)
    contracting = ((2,) if transpose_lhs else (3,), (3,) if transpose_rhs else (2,))
    return jax.lax.dot_general(lhs, rhs, (contracting, ((0, 1), (0, 1))), preferred_element_type=jnp.float32)


# Shapes: B batch, K key/value heads, Q queries (the G heads of a group times T positions), S keys, D head dim.
def _probabilities(query, key, bias, groups):
    batch, kv_heads, queries, _ = query.shape
    scores = _batch_matmul(query, key, transpose_rhs=True)  # [B, K, Q, S]
    # The bias is [B, K|1, G|1, T|1, S]: added to the scores with their query axis viewed as (G, T).
    scores = (scores.reshape(batch, kv_heads, groups, queries // groups, -1) + bias).reshape(scores.shape)
    scores = scores - jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores)
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _attend(probabilities, value, dtype):
    return _batch_matmul(probabilities.astype(dtype), value)  # [B, K, Q, D]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _heads_major_attention(query, key, value, bias, groups, dtype):
    return _attend(_probabilities(query, key, bias, groups), value, dtype)


def _heads_major_attention_forward(query, key, value, bias, groups, dtype):
    probabilities = _probabilities(query, key, bias, groups).astype(dtype)
    out = _attend(probabilities, value, dtype)
    return out, (query, key, value, probabilities, out)


def _heads_major_attention_backward(groups, dtype, residuals, out_grad):
    query, key, value, probabilities, out = residuals
    out_grad_operand = out_grad.astype(dtype)
    value_grad = _batch_matmul(probabilities, out_grad_operand, transpose_lhs=True)  # Pᵀ dO: [B, K, S, D]
    probabilities_grad = _batch_matmul(out_grad_operand, value, transpose_rhs=True)  # dO Vᵀ: [B, K, Q, S]
    # Kept out of the fusion with the product below: fused, XLA:CPU recomputes the reduction per tile.
    row_dot = jax.lax.optimization_barrier(jnp.einsum("bkqd,bkqd->bkq", out_grad, out)[..., None])
    scores_grad = (probabilities.astype(jnp.float32) * (probabilities_grad - row_dot)).astype(dtype)
    query_grad = _batch_matmul(scores_grad, key)  # dS K: [B, K, Q, D]
    key_grad = _batch_matmul(scores_grad, query, transpose_lhs=True)  # dSᵀ Q: [B, K, S, D]
    return query_grad.astype(query.dtype), key_grad.astype(key.dtype), value_grad.astype(value.dtype), None


_heads_major_attention.defvjp(_heads_major_attention_forward, _heads_major_attention_backward)


def _fused_kernel(query):
    """The fused attention kernel for these operands: AMX tiles for bfloat16 where `amx.takes` them, else the vector
    units (`jaxrm.kernels.attention`: bfloat16 products on AVX512-BF16, or float32 on widened operands)."""
    return amx if amx.takes(query) else attention_kernel


@jax.custom_vjp
def _fused_attention(query, key, value, bias):
    # Not differentiated: P is never written out.
    return _fused_kernel(query).attention(query, key, value, bias, probabilities=False)[0]


def _fused_attention_forward(query, key, value, bias):
    out, probabilities = _fused_kernel(query).attention(query, key, value, bias)
    return out, (query, key, value, probabilities, out)


def _fused_attention_backward(residuals, out_grad):
    query, key, value, probabilities, out = residuals
    grads = _fused_kernel(query).attention_backward(query, key, value, probabilities, out, out_grad)
    return (*(grad.astype(x.dtype) for grad, x in zip(grads, (query, key, value))), None)


_fused_attention.defvjp(_fused_attention_forward, _fused_attention_backward)
