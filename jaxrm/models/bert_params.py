"""Hugging Face checkpoint layout of the BERT backbone.

``BertForSequenceClassification`` (and ``BertForMaskedLM``, ``BertForPreTraining``) checkpoints keep the
backbone under ``bert.``; checkpoints saved from a plain ``BertModel`` (MiniLM, sentence-transformers)
have no prefix. Keys below are written without it; `param_table` expands the per-layer template over the
config's layers. The pooler (``pooler.dense.*``) belongs to the reward head, not to this table.
"""

from __future__ import annotations

import transformers

from jaxrm.models.bert import BertSpec
from jaxrm.models.param_table import AS_IS, TRANSPOSE, ParamRow, expand, export_params, load_params

__all__ = ["HF_BACKBONE_PREFIX", "IGNORED_HF_KEYS", "ParamRow", "export_params", "load_params", "param_table"]

HF_BACKBONE_PREFIX = "bert."

# Position ids are a buffer that old checkpoints saved; the language-model and next-sentence heads of
# pre-training checkpoints are not part of a reward model.
IGNORED_HF_KEYS = (
    r"(bert\.)?embeddings\.position_ids",
    r"cls\..*",
)

_TOP_LEVEL = (
    ("embeddings.word_embeddings.weight",       ("embeddings", "word_embeddings", "embedding"),       AS_IS),
    ("embeddings.position_embeddings.weight",   ("embeddings", "position_embeddings", "embedding"),   AS_IS),
    ("embeddings.token_type_embeddings.weight", ("embeddings", "token_type_embeddings", "embedding"), AS_IS),
    ("embeddings.LayerNorm.weight",             ("embeddings", "layer_norm", "scale"),                AS_IS),
    ("embeddings.LayerNorm.bias",               ("embeddings", "layer_norm", "bias"),                 AS_IS),
)

_LAYER = (
    ("attention.self.query.weight",         ("attention", "query", "kernel"),  TRANSPOSE),
    ("attention.self.query.bias",           ("attention", "query", "bias"),    AS_IS),
    ("attention.self.key.weight",           ("attention", "key", "kernel"),    TRANSPOSE),
    ("attention.self.key.bias",             ("attention", "key", "bias"),      AS_IS),
    ("attention.self.value.weight",         ("attention", "value", "kernel"),  TRANSPOSE),
    ("attention.self.value.bias",           ("attention", "value", "bias"),    AS_IS),
    ("attention.output.dense.weight",       ("attention", "output", "kernel"), TRANSPOSE),
    ("attention.output.dense.bias",         ("attention", "output", "bias"),   AS_IS),
    ("attention.output.LayerNorm.weight",   ("attention_norm", "scale"),       AS_IS),
    ("attention.output.LayerNorm.bias",     ("attention_norm", "bias"),        AS_IS),
    ("intermediate.dense.weight",           ("intermediate", "kernel"),        TRANSPOSE),
    ("intermediate.dense.bias",             ("intermediate", "bias"),          AS_IS),
    ("output.dense.weight",                 ("output", "kernel"),              TRANSPOSE),
    ("output.dense.bias",                   ("output", "bias"),                AS_IS),
    ("output.LayerNorm.weight",             ("output_norm", "scale"),          AS_IS),
    ("output.LayerNorm.bias",               ("output_norm", "bias"),           AS_IS),
)  # fmt: skip


def param_table(config: transformers.PretrainedConfig) -> list[ParamRow]:
    """One `ParamRow` per backbone tensor of a checkpoint with this config, layers expanded."""
    spec = BertSpec.from_config(config)
    rows = expand(_TOP_LEVEL, "", ())
    for index in range(spec.num_layers):
        rows += expand(_LAYER, f"encoder.layer.{index}.", ("layers", index))
    return rows
