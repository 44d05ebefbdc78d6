"""Hugging Face checkpoint layout of the decoder backbone (Llama, Qwen2, Qwen3, Mistral).

Backbone tensors sit under ``model.`` in both ``*ForCausalLM`` and ``*ForSequenceClassification``
checkpoints. Keys below are written without that prefix; `param_table` expands the per-layer template
over the config's layers and keeps only the rows the config's architecture has.
"""

from __future__ import annotations

import transformers

from jaxrm.models.decoder import DecoderSpec
from jaxrm.models.param_table import AS_IS, TRANSPOSE, ParamRow, expand, export_params, load_params

__all__ = ["HF_BACKBONE_PREFIX", "IGNORED_HF_KEYS", "ParamRow", "export_params", "load_params", "param_table"]

HF_BACKBONE_PREFIX = "model."

# The language-model head is not part of the backbone (and is absent when embeddings are tied); old
# checkpoints also stored RoPE frequency buffers, which the backbone recomputes.
IGNORED_HF_KEYS = ("lm_head.weight", r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Columns: HF key suffix, NNX path below the module, layout transform, the DecoderSpec flag that must be
# set for the tensor to exist (None: always present).
_TOP_LEVEL = (
    ("embed_tokens.weight", ("embed_tokens", "embedding"), AS_IS, None),
    ("norm.weight", ("norm", "scale"), AS_IS, None),
)

_LAYER = (
    ("input_layernorm.weight",          ("input_layernorm", "scale"),          AS_IS,     None),
    ("self_attn.q_proj.weight",         ("self_attn", "q_proj", "kernel"),     TRANSPOSE, None),
    ("self_attn.q_proj.bias",           ("self_attn", "q_proj", "bias"),       AS_IS,     "qkv_bias"),
    ("self_attn.k_proj.weight",         ("self_attn", "k_proj", "kernel"),     TRANSPOSE, None),
    ("self_attn.k_proj.bias",           ("self_attn", "k_proj", "bias"),       AS_IS,     "qkv_bias"),
    ("self_attn.v_proj.weight",         ("self_attn", "v_proj", "kernel"),     TRANSPOSE, None),
    ("self_attn.v_proj.bias",           ("self_attn", "v_proj", "bias"),       AS_IS,     "qkv_bias"),
    ("self_attn.o_proj.weight",         ("self_attn", "o_proj", "kernel"),     TRANSPOSE, None),
    ("self_attn.o_proj.bias",           ("self_attn", "o_proj", "bias"),       AS_IS,     "o_bias"),
    ("self_attn.q_norm.weight",         ("self_attn", "q_norm", "scale"),      AS_IS,     "qk_norm"),
    ("self_attn.k_norm.weight",         ("self_attn", "k_norm", "scale"),      AS_IS,     "qk_norm"),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), AS_IS,     None),
    ("mlp.gate_proj.weight",            ("mlp", "gate_proj", "kernel"),        TRANSPOSE, None),
    ("mlp.gate_proj.bias",              ("mlp", "gate_proj", "bias"),          AS_IS,     "mlp_bias"),
    ("mlp.up_proj.weight",              ("mlp", "up_proj", "kernel"),          TRANSPOSE, None),
    ("mlp.up_proj.bias",                ("mlp", "up_proj", "bias"),            AS_IS,     "mlp_bias"),
    ("mlp.down_proj.weight",            ("mlp", "down_proj", "kernel"),        TRANSPOSE, None),
    ("mlp.down_proj.bias",              ("mlp", "down_proj", "bias"),          AS_IS,     "mlp_bias"),
)  # fmt: skip


def param_table(config: transformers.PretrainedConfig) -> list[ParamRow]:
    """One `ParamRow` per backbone tensor of a checkpoint with this config, layers expanded."""
    spec = DecoderSpec.from_config(config)

    def present(template):
        return [(hf, path, transform) for hf, path, transform, flag in template if flag is None or getattr(spec, flag)]

    rows = expand(present(_TOP_LEVEL), "", ())
    for index in range(spec.num_layers):
        rows += expand(present(_LAYER), f"layers.{index}.", ("layers", index))
    return rows
