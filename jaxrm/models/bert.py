"""BERT encoder backbone for Hugging Face ``bert`` checkpoints (BERT, MiniLM, and other BertModel derivatives).

The output is the last hidden state, as transformers' ``BertModel(...).last_hidden_state``: word, position
and token-type embeddings (token type 0 everywhere), a post-LayerNorm transformer encoder with
bidirectional attention over the real tokens, and the GELU flavour the config's ``hidden_act`` names.
The pooler (dense + tanh on the first token) is not part of the backbone: `jaxrm.models.RewardModel` keeps
it in the reward head, where ``BertForSequenceClassification`` uses it.

Positions of real tokens count from the first real token of their sequence, so a right-padded batch
matches transformers exactly and a left-padded one gives the same hidden states for its real tokens
(transformers would shift the positions of a left-padded sequence); packed rows (several sequences per
row, told apart by segment ids) give each sequence what it would get alone. Dropout is not applied: the backbone is
deterministic, as in transformers' eval mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from jaxrm.models.layers import (Dense, attention, dense_together, logical_axes, normalize, positions_in_segment,
                                 segment_mask)

SUPPORTED_MODEL_TYPES = ("bert",)
DEFAULT_POOLING = "first"

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertSpec:
    """Everything the backbone (and its parameter table) needs to know from a Hugging Face config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config: transformers.PretrainedConfig) -> BertSpec:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Model type {model_type!r} is not an encoder this backbone supports; "
                f"use one of {SUPPORTED_MODEL_TYPES}."
            )
        position_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if position_type != "absolute":
            raise ValueError(
                f"Only absolute position embeddings are supported, got position_embedding_type={position_type!r}."
            )
        if getattr(config, "is_decoder", False):
            raise ValueError("BERT configs with is_decoder=True are not supported; use an encoder checkpoint.")
        hidden_act = config.hidden_act
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={hidden_act!r} is not supported; use one of {tuple(_ACTIVATIONS)}.")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} does not divide into {config.num_attention_heads} attention heads."
            )
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size,
            layer_norm_eps=float(config.layer_norm_eps),
            hidden_act=hidden_act,
            initializer_range=float(getattr(config, "initializer_range", 0.02)),
        )


class LayerNorm(nnx.Module):
    """LayerNorm with the statistics in float32, cast back to the compute dtype before scale and shift."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **logical_axes(None))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), **logical_axes(None))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return normalize(x, self.scale[...], self.bias[...], eps=self.eps, dtype=self.dtype)


def _linear(in_features, out_features, axes, *, spec, dtype, param_dtype, rngs) -> Dense:
    return Dense(in_features, out_features, axes, dtype=dtype, param_dtype=param_dtype,
                 init_scale=spec.initializer_range, rngs=rngs)


def _embed(count, spec, axes, *, param_dtype, rngs) -> nnx.Embed:
    return nnx.Embed(
        count,
        spec.hidden_size,
        param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(spec.initializer_range),
        embedding_metadata=logical_axes(*axes),
        rngs=rngs,
    )


class Embeddings(nnx.Module):
    def __init__(self, spec: BertSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        common = dict(param_dtype=param_dtype, rngs=rngs)
        self.word_embeddings = _embed(spec.vocab_size, spec, ("vocab", "embed"), **common)
        self.position_embeddings = _embed(spec.max_position_embeddings, spec, (None, "embed"), **common)
        self.token_type_embeddings = _embed(spec.type_vocab_size, spec, (None, "embed"), **common)
        self.layer_norm = LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        # Summed in the parameter dtype, as transformers does; the LayerNorm returns the compute dtype.
        summed = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.embedding[0]
        )
        return self.layer_norm(summed)


class SelfAttention(nnx.Module):
    def __init__(self, spec: BertSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        common = dict(spec=spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = _linear(spec.hidden_size, spec.hidden_size, ("embed", "heads"), **common)
        self.key = _linear(spec.hidden_size, spec.hidden_size, ("embed", "heads"), **common)
        self.value = _linear(spec.hidden_size, spec.hidden_size, ("embed", "heads"), **common)
        self.output = _linear(spec.hidden_size, spec.hidden_size, ("heads", "embed"), **common)
        self.num_heads = spec.num_heads
        self.head_dim = spec.head_dim
        self.dtype = dtype

    def __call__(self, x: jax.Array, mask: jax.Array, queries: jax.Array | None = None) -> jax.Array:
        """Attention of ``queries`` [B, Q, H] (default: every position of ``x``) over ``x`` [B, T, H]."""
        batch, length, hidden = x.shape
        if queries is None:
            queries = x
            query, key, value = dense_together(x, self.query, self.key, self.value)
        else:
            query = self.query(queries)
            key, value = dense_together(x, self.key, self.value)
        query = query.reshape(batch, queries.shape[1], self.num_heads, self.head_dim)
        key, value = (projection.reshape(batch, length, self.num_heads, self.head_dim) for projection in (key, value))
        attended = attention(query, key, value, mask, scale=self.head_dim**-0.5, dtype=self.dtype)
        return self.output(attended.reshape(batch, queries.shape[1], hidden))


class EncoderLayer(nnx.Module):
    def __init__(self, spec: BertSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
        common = dict(spec=spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=spec.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.attention = SelfAttention(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm = LayerNorm(spec.hidden_size, **norm)
        self.intermediate = _linear(spec.hidden_size, spec.intermediate_size, ("embed", "mlp"), **common)
        self.output = _linear(spec.intermediate_size, spec.hidden_size, ("mlp", "embed"), **common)
        self.output_norm = LayerNorm(spec.hidden_size, **norm)
        self.activation = _ACTIVATIONS[spec.hidden_act]

    def __call__(self, x: jax.Array, mask: jax.Array, queries: jax.Array | None = None) -> jax.Array:
        """The layer's output at every position of ``x``, or only at the rows ``queries`` [B, Q, H] of it."""
        queries = x if queries is None else queries
        x = self.attention_norm(queries + self.attention(x, mask, queries))
        return self.output_norm(x + self.output(self.activation(self.intermediate(x))))


def _run_layer(layer: EncoderLayer, x: jax.Array, mask: jax.Array, queries: jax.Array | None = None) -> jax.Array:
    return layer(x, mask, queries)


class BertBackbone(nnx.Module):
    """Embeddings and encoder layers of a BERT model.

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
        spec = BertSpec.from_config(config)
        self.spec = spec
        self.hidden_size = spec.hidden_size
        self.dtype = dtype
        self.remat = remat
        self.embeddings = Embeddings(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [EncoderLayer(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(spec.num_layers)]
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 positions: jax.Array | None = None) -> jax.Array:
        """Maps token ids [B, T] and a padding mask [B, T] (1 or True on real tokens) to hidden states [B, T, H].

        ``attention_mask`` may also hold segment ids of packed rows (0 = padding, j ≥ 1 = the j-th sequence
        of the row; see `jaxrm.models.layers.positions_in_segment`): each sequence then attends only to
        itself and counts its positions from 0, exactly as if it had a row of its own.

        With ``positions`` (int [B, Q]), returns only the hidden states at those columns of each row,
        [B, Q, H]: the last layer then computes its queries, attention output and feed-forward
        block for those tokens instead of all T (a reward model reads one pooled token per sequence; this
        is ~1/6 of MiniLM's compute).
        """
        input_ids = jnp.asarray(input_ids)
        segment_ids = jnp.asarray(attention_mask).astype(jnp.int32)
        if input_ids.shape[-1] > self.spec.max_position_embeddings:
            raise ValueError(
                f"Sequences of {input_ids.shape[-1]} tokens exceed the model's "
                f"{self.spec.max_position_embeddings} position embeddings; truncate them."
            )
        # Real tokens count from 0 within their sequence whatever the padding side; pad tokens keep their
        # index, which is what transformers gives every token, so right-padded batches match it at pad
        # positions as well.
        position_ids = jnp.where(segment_ids != 0, positions_in_segment(segment_ids),
                                 jnp.arange(input_ids.shape[-1]))
        # A query attends to the real keys of its own sequence (transformers' padding mask when a row
        # holds one); a row with no real token falls back to uniform attention, which stays finite.
        mask = segment_mask(segment_ids, segment_ids)

        run_layer = nnx.remat(_run_layer) if self.remat else _run_layer
        hidden = self.embeddings(input_ids, position_ids)
        for layer in self.layers[:-1]:
            hidden = run_layer(layer, hidden, mask)
        if positions is None:
            return run_layer(self.layers[-1], hidden, mask)
        selected = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        query_mask = segment_mask(jnp.take_along_axis(segment_ids, positions, axis=1), segment_ids)
        return run_layer(self.layers[-1], hidden, query_mask, selected)
