"""The model families jaxrm can load, and how each lays out its Hugging Face sequence-classification head."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import transformers

from jaxrm.models import bert, bert_params, decoder, decoder_params
from jaxrm.models.param_table import ParamRow


@dataclasses.dataclass(frozen=True)
class Family:
    """A backbone implementation, its checkpoint layout, and its ``*ForSequenceClassification`` head."""

    backbone: type
    """Module class with the ``(config, *, dtype, param_dtype, remat, rngs)`` constructor, called as
    ``backbone(input_ids, attention_mask, positions=None)``: hidden states [B, T, H], or with positions
    (int [B, Q]) only those columns of each row, [B, Q, H] (the reward model's pooled tokens)."""
    param_table: Callable[[transformers.PretrainedConfig], list[ParamRow]]
    hf_prefix: str
    """Prefix of the backbone's keys in ``*ForSequenceClassification`` and ``*ForCausalLM`` checkpoints."""
    ignored_keys: tuple[str, ...]
    """Regular expressions (full match) for checkpoint keys that are neither backbone nor head."""
    default_pooling: str
    architectures: Mapping[str, str]
    """Sequence-classification class per ``model_type``, written into exported configs."""
    classifier: str
    """Key stem of the classification layer in a sequence-classification checkpoint (no prefix)."""
    classifier_bias: bool
    """Whether transformers' classification layer has a bias."""
    pooler: str | None = None
    """Key stem, below `hf_prefix`, of a dense + tanh layer transformers applies before the classifier."""

    def is_ignored(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.ignored_keys)


DECODER = Family(
    backbone=decoder.DecoderBackbone,
    param_table=decoder_params.param_table,
    hf_prefix=decoder_params.HF_BACKBONE_PREFIX,
    ignored_keys=tuple(decoder_params.IGNORED_HF_KEYS),
    default_pooling=decoder.DEFAULT_POOLING,
    architectures={
        "llama": "LlamaForSequenceClassification",
        "qwen2": "Qwen2ForSequenceClassification",
        "qwen3": "Qwen3ForSequenceClassification",
        "mistral": "MistralForSequenceClassification",
    },
    classifier="score",
    classifier_bias=False,
)

BERT = Family(
    backbone=bert.BertBackbone,
    param_table=bert_params.param_table,
    hf_prefix=bert_params.HF_BACKBONE_PREFIX,
    ignored_keys=tuple(bert_params.IGNORED_HF_KEYS),
    default_pooling=bert.DEFAULT_POOLING,
    architectures={"bert": "BertForSequenceClassification"},
    classifier="classifier",
    classifier_bias=True,
    pooler="pooler.dense",
)

FAMILIES: dict[str, Family] = {
    **{model_type: DECODER for model_type in decoder.SUPPORTED_MODEL_TYPES},
    **{model_type: BERT for model_type in bert.SUPPORTED_MODEL_TYPES},
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_for(model_type: str | None) -> Family:
    """The family of a ``model_type``; a ValueError listing the supported types for any other."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"Model type {model_type!r} is not supported; jaxrm loads {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints."
        )
    return FAMILIES[model_type]
