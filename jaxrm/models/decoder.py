"""Decoder-only transformer backbone for Llama, Qwen2, Qwen3 and Mistral checkpoints.

One implementation covers the four families; the Hugging Face config decides what differs between
them: grouped-query attention with any number of key/value heads, RoPE (default or Llama 3 scaling),
q/k/v biases (Qwen2, or ``attention_bias``), per-head q/k RMSNorm (Qwen3), and sliding-window layers
(Mistral, or Qwen ``layer_types``). The output is the final-normed last hidden state, as transformers'
``LlamaModel(...).last_hidden_state``.

Positions count from the first real token of each sequence, so left- and right-padded batches give the
same hidden states for their real tokens, and packed rows (several sequences per row, told apart by
segment ids) give each sequence what it would get alone. Pad tokens' outputs are meaningless and must be
ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from jaxrm.models.layers import Dense, attention, logical_axes, normalize, positions_in_segment, segment_mask

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
DEFAULT_POOLING = "last"

_SUPPORTED_ROPE_TYPES = ("default", "llama3")

# Parameters carry logical axis names (`layers.logical_axes`), which the training engine maps to mesh axes (embed -> "fsdp";
# heads, kv_heads, mlp, vocab -> "model"); None means replicated. The names are metadata only: the
# module never places parameters on devices itself, so it builds the same way with or without a mesh.


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding settings, read from ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (transformers 4)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_config(cls, config: transformers.PretrainedConfig) -> RopeSpec:
        params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        if rope_type not in _SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"RoPE type {rope_type!r} is not supported; use a checkpoint with one of {_SUPPORTED_ROPE_TYPES}."
            )
        if rope_type == "default":
            return cls(theta=float(theta))
        return cls(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings") or config.max_position_embeddings
            ),
        )

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """The ``head_dim // 2`` rotation frequencies, computed like transformers' RoPE initialisers."""
        inv_freq = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        if self.rope_type == "llama3":
            # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
            wavelength = 2 * math.pi / inv_freq
            low_freq_wavelength = self.original_max_position_embeddings / self.low_freq_factor
            high_freq_wavelength = self.original_max_position_embeddings / self.high_freq_factor
            scaled = np.where(wavelength > low_freq_wavelength, inv_freq / self.factor, inv_freq)
            smooth = (self.original_max_position_embeddings / wavelength - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            blended = (1 - smooth) * scaled / self.factor + smooth * scaled
            is_medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
            inv_freq = np.where(is_medium, blended, scaled)
        return inv_freq.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """Everything the backbone (and its parameter table) needs to know from a Hugging Face config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    rope: RopeSpec
    initializer_range: float = 0.02

    @classmethod
    def from_config(cls, config: transformers.PretrainedConfig) -> DecoderSpec:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Model type {model_type!r} is not a decoder this backbone supports; "
                f"use one of {SUPPORTED_MODEL_TYPES}."
            )
        if config.hidden_act != "silu":
            raise ValueError(f"Only the SwiGLU MLP (hidden_act='silu') is supported, got {config.hidden_act!r}.")
        num_heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        # Qwen2 hard-codes biases on q, k and v (never on o) whatever `attention_bias` says.
        is_qwen2 = model_type == "qwen2"
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=float(config.rms_norm_eps),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_windows=_sliding_windows(config),
            rope=RopeSpec.from_config(config),
            initializer_range=float(getattr(config, "initializer_range", 0.02)),
        )


def _sliding_windows(config: transformers.PretrainedConfig) -> tuple[int | None, ...]:
    """The attention window of each layer, None for full causal attention."""
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return (None,) * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral: every layer slides.
        return (window,) * num_layers
    return tuple(window if layer_type == "sliding_attention" else None for layer_type in layer_types)


class RMSNorm(nnx.Module):
    """RMSNorm with the statistics in float32, scaled after casting back (as transformers does)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **logical_axes(None))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return normalize(x, self.scale[...], None, eps=self.eps, dtype=self.dtype, center=False)


def _linear(in_features, out_features, axes, *, bias, spec, dtype, param_dtype, rngs) -> Dense:
    return Dense(in_features, out_features, axes, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                 init_scale=spec.initializer_range, rngs=rngs)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Applies RoPE to x [B, T, heads, head_dim] in transformers' half-split layout; cos/sin are [B, T, head_dim/2]."""
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


class Rows(NamedTuple):
    """Hidden states of selected positions [B, Q, H] with their rotary cos/sin [B, Q, head_dim/2]."""

    hidden: jax.Array
    cos: jax.Array
    sin: jax.Array


class Attention(nnx.Module):
    def __init__(self, spec: DecoderSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        common = dict(spec=spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        q_features = spec.num_heads * spec.head_dim
        kv_features = spec.num_kv_heads * spec.head_dim
        self.q_proj = _linear(spec.hidden_size, q_features, ("embed", "heads"), bias=spec.qkv_bias, **common)
        self.k_proj = _linear(spec.hidden_size, kv_features, ("embed", "kv_heads"), bias=spec.qkv_bias, **common)
        self.v_proj = _linear(spec.hidden_size, kv_features, ("embed", "kv_heads"), bias=spec.qkv_bias, **common)
        self.o_proj = _linear(q_features, spec.hidden_size, ("heads", "embed"), bias=spec.o_bias, **common)
        norm = dict(eps=spec.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(spec.head_dim, **norm) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, **norm) if spec.qk_norm else None
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.dtype = dtype

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 queries: Rows | None = None) -> jax.Array:
        """Attention of every position of ``x`` [B, T, H], or of the rows ``queries`` (hidden states
        [B, Q, H] with their own cos/sin), over the keys and values of ``x``."""
        batch, length, _ = x.shape
        if queries is None:
            queries = Rows(x, cos, sin)
        num_queries = queries.hidden.shape[1]
        query = self.q_proj(queries.hidden).reshape(batch, num_queries, self.num_heads, self.head_dim)
        key = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        value = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = _rotate(query, queries.cos, queries.sin), _rotate(key, cos, sin)
        # Query head h reads key/value head h // (num_heads // num_kv_heads), as transformers' repeat_kv.
        attended = attention(query, key, value, mask, scale=self.head_dim**-0.5, dtype=self.dtype)
        return self.o_proj(attended.reshape(batch, num_queries, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, spec: DecoderSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        common = dict(bias=spec.mlp_bias, spec=spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(spec.hidden_size, spec.intermediate_size, ("embed", "mlp"), **common)
        self.up_proj = _linear(spec.hidden_size, spec.intermediate_size, ("embed", "mlp"), **common)
        self.down_proj = _linear(spec.intermediate_size, spec.hidden_size, ("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, spec: DecoderSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=spec.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(spec.hidden_size, **norm)
        self.self_attn = Attention(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, **norm)
        self.mlp = MLP(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 positions: jax.Array | None = None) -> jax.Array:
        """The layer's output at every position of ``x``, or only at the columns ``positions`` [B, Q] of
        each row (then ``mask`` holds those query rows only, [B, 1, Q, T])."""
        normed = self.input_layernorm(x)
        if positions is None:
            x = x + self.self_attn(normed, cos, sin, mask)
        else:
            take = functools.partial(_take_rows, positions=positions)
            x = take(x) + self.self_attn(normed, cos, sin, mask, Rows(take(normed), take(cos), take(sin)))
        return x + self.mlp(self.post_attention_layernorm(x))


def _take_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
    """``x[b, positions[b, q]]`` for x [B, T, ...] and positions [B, Q]: [B, Q, ...]."""
    return jnp.take_along_axis(x, positions.reshape(*positions.shape, *(1,) * (x.ndim - 2)), axis=1)


def _run_layer(layer: DecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               positions: jax.Array | None = None) -> jax.Array:
    return layer(x, cos, sin, mask, positions)


def _attention_mask(segment_ids: jax.Array, window: int | None) -> jax.Array:
    """Boolean [B, 1, T, T] mask: causal, within the sliding window, and only onto real tokens of the
    query's own sequence (`jaxrm.models.layers.segment_mask`; one sequence per row is a padding mask).

    Every query may also attend to itself, so a pad query with no real token before it (left padding)
    still has one allowed key and its softmax, and hence the gradient, stays finite.
    """
    length = segment_ids.shape[-1]
    query_index = jnp.arange(length)[:, None]
    key_index = jnp.arange(length)[None, :]
    allowed = key_index <= query_index
    if window is not None:
        allowed &= key_index > query_index - window
    return (segment_mask(segment_ids, segment_ids) & allowed) | jnp.eye(length, dtype=bool)


class DecoderBackbone(nnx.Module):
    """Embeddings, decoder layers and the final RMSNorm of a Llama-style causal language model.

    Args:
      config: a Hugging Face config whose ``model_type`` is in `SUPPORTED_MODEL_TYPES`.
      dtype: compute dtype (activations and the output).
      param_dtype: dtype the parameters are stored in.
      remat: recompute each layer's activations in the backward pass instead of storing them.
      rngs: random streams for initialisation.
    """

    def __init__(
        self,
        config: transformers.PretrainedConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        spec = DecoderSpec.from_config(config)
        self.spec = spec
        self.hidden_size = spec.hidden_size
        self.dtype = dtype
        self.remat = remat
        self.embed_tokens = nnx.Embed(
            spec.vocab_size,
            spec.hidden_size,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(spec.initializer_range),
            embedding_metadata=logical_axes("vocab", "embed"),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [DecoderLayer(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(spec.num_layers)]
        )
        self.norm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 positions: jax.Array | None = None) -> jax.Array:
        """Maps token ids [B, T] and a padding mask [B, T] (1 or True on real tokens) to hidden states [B, T, H].

        ``attention_mask`` may also hold segment ids of packed rows (0 = padding, j ≥ 1 = the j-th sequence
        of the row): each sequence then attends only to itself and counts its positions from 0.

        With ``positions`` (int [B, Q]), returns only the hidden states at those columns of each row,
        [B, Q, H]: the last layer computes its queries, attention output and MLP for those tokens
        instead of all T (a reward model reads one token per sequence; 1/L of the layers' compute).
        """
        segment_ids = jnp.asarray(attention_mask).astype(jnp.int32)
        # Real tokens count from 0 within their sequence whatever the padding side.
        token_positions = jnp.where(segment_ids != 0, positions_in_segment(segment_ids), 0)
        angles = token_positions[..., None].astype(jnp.float32) * self.spec.rope.inverse_frequencies(self.spec.head_dim)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        masks = {window: _attention_mask(segment_ids, window) for window in set(self.spec.sliding_windows)}

        run_layer = nnx.remat(_run_layer) if self.remat else _run_layer
        hidden = self.embed_tokens(jnp.asarray(input_ids)).astype(self.dtype)
        *body, (last, last_window) = zip(self.layers, self.spec.sliding_windows)
        for layer, window in body:
            hidden = run_layer(layer, hidden, cos, sin, masks[window])
        if positions is None:
            return self.norm(run_layer(last, hidden, cos, sin, masks[last_window]))
        query_mask = jnp.take_along_axis(masks[last_window], positions[:, None, :, None], axis=2)  # [B, 1, Q, T]
        return self.norm(run_layer(last, hidden, cos, sin, query_mask, positions))
