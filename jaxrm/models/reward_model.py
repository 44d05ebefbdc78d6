"""A reward model: a Hugging Face backbone, one pooled hidden state per sequence, and a float32 linear head.

Pooling reads the attention mask, never the token ids: ``"last"`` takes the last position whose mask is
1 (decoders: right or left padding, and correct when the pad token is the end-of-sequence token),
``"first"`` the first such position (encoders' ``[CLS]``).

Compatibility with transformers' ``*ForSequenceClassification`` models, which `RewardModel.save_pretrained`
writes and `RewardModel.from_pretrained` reads:

* BERT. ``BertForSequenceClassification`` scores ``classifier(tanh(pooler(h[:, 0])))``. jaxrm keeps that
  pooler (dense + tanh) in its reward head for ``bert`` models, loads it from the checkpoint when
  present (plain ``BertModel`` checkpoints such as MiniLM ship one) and exports it, so an exported BERT
  reward model scores the same in both libraries. A head built with ``head_bias=False`` exports a zero
  ``classifier.bias``.
* Decoders. ``LlamaForSequenceClassification`` (and the Qwen2/Qwen3/Mistral classes) has a bias-free
  ``score`` layer and pools the last token that is not ``config.pad_token_id``. That finds the same
  token as jaxrm's mask rule unless a sequence ends with the pad id itself, which happens when the pad
  token is the end-of-sequence token and sequences end with it (huggingface/transformers#35352): there
  transformers scores the token before the final EOS while jaxrm scores the EOS. Export with a tokenizer
  whose pad token differs from EOS when PyTorch consumers must match exactly.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from jaxrm.models.layers import logical_axes
from jaxrm.models.param_table import AS_IS, TRANSPOSE, ParamRow, export_params, expand, load_params
from jaxrm.models.registry import Family, family_for
from jaxrm.models.tokenizer import load_tokenizer
from jaxrm.models.weights import (
    INDEX_FILE,
    WEIGHTS_FILE,
    RenamedKeys,
    SafetensorsCheckpoint,
    model_dir,
    read_model_type,
    save_safetensors,
)

POOLINGS = ("last", "first")

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
)

_MAX_LISTED_KEYS = 12


def pooled_positions(attention_mask: jax.Array, pooling: str, num_segments: int | None = None) -> jax.Array:
    """Each row's last (``"last"``) or first (``"first"``) position where the mask is 1, int [B].

    With ``num_segments`` = M, ``attention_mask`` holds segment ids of packed rows (0 = padding, j ≥ 1 = the
    j-th sequence of the row) and the result is int [B, M]: the pooled position of sequences 1 … M of each
    row (0 for a sequence the row does not hold).
    """
    segment_ids = jnp.asarray(attention_mask).astype(jnp.int32)
    wanted = jnp.arange(1, 1 + (num_segments or 1))
    members = segment_ids[:, None, :] == wanted[None, :, None]  # [B, M, T]
    if pooling == "last":
        positions = members.shape[-1] - 1 - jnp.argmax(members[..., ::-1], axis=-1)
        positions = jnp.where(jnp.any(members, axis=-1), positions, 0)
    elif pooling == "first":
        positions = jnp.argmax(members, axis=-1)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    return positions[:, 0] if num_segments is None else positions


def pool(hidden: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """The hidden state [B, H] at each row's last (``"last"``) or first (``"first"``) position where the mask is 1."""
    index = pooled_positions(attention_mask, pooling)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


class RewardHead(nnx.Module):
    """Pooled hidden state [B, H] → rewards [B, K], in float32 whatever the backbone's dtype.

    The score layer starts with weights of standard deviation 1/√(H + 1), so that initial rewards are of
    order one or less. ``pooler`` adds BERT's dense + tanh layer in front of it.
    """

    def __init__(
        self,
        hidden_size: int,
        num_objectives: int,
        *,
        bias: bool = False,
        pooler: bool = False,
        initializer_range: float = 0.02,
        rngs: nnx.Rngs,
    ):
        float32 = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.pooler = (
            nnx.Linear(
                hidden_size,
                hidden_size,
                kernel_init=nnx.initializers.normal(initializer_range),
                kernel_metadata=logical_axes("embed", None),
                bias_metadata=logical_axes(None),
                **float32,
            )
            if pooler
            else None
        )
        self.score = nnx.Linear(
            hidden_size,
            num_objectives,
            use_bias=bias,
            kernel_init=nnx.initializers.normal(1.0 / math.sqrt(hidden_size + 1)),
            kernel_metadata=logical_axes("embed", None),
            bias_metadata=logical_axes(None),
            **float32,
        )

    def __call__(self, pooled: jax.Array) -> jax.Array:
        features = pooled.astype(jnp.float32)
        if self.pooler is not None:
            features = jnp.tanh(self.pooler(features))
        return self.score(features)


class _Static:
    """Holds a value as static module data, hashed and compared by identity (transformers configs are unhashable)."""

    def __init__(self, value):
        self.value = value


def _as_rngs(rngs: nnx.Rngs | int) -> nnx.Rngs:
    return rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(rngs)


def _head_rows(family: Family, *, bias: bool) -> list[ParamRow]:
    """The head's tensors, keyed as in a checkpoint after the backbone prefix is removed."""
    template = [(f"{family.classifier}.weight", ("score", "kernel"), TRANSPOSE)]
    if bias:
        template.append((f"{family.classifier}.bias", ("score", "bias"), AS_IS))
    if family.pooler is not None:
        template += [
            (f"{family.pooler}.weight", ("pooler", "kernel"), TRANSPOSE),
            (f"{family.pooler}.bias", ("pooler", "bias"), AS_IS),
        ]
    return expand(template, "", ("head",))


def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(key) for key in keys[:_MAX_LISTED_KEYS])
    return shown + (f" and {len(keys) - _MAX_LISTED_KEYS} more" if len(keys) > _MAX_LISTED_KEYS else "")


def _checkpoint_names(family: Family, checkpoint, directory: Path) -> dict[str, str]:
    """Key without the backbone prefix → checkpoint key, for every tensor that is not ignored."""
    names: dict[str, str] = {}
    for key in checkpoint:
        if family.is_ignored(key):
            continue
        name = key.removeprefix(family.hf_prefix)
        if name in names:
            raise ValueError(
                f"The checkpoint in {directory} has both {names[name]!r} and {key!r}; keep one of them."
            )
        names[name] = key
    return names


def _check_keys(family: Family, names: dict[str, str], backbone_rows: list[ParamRow], model_type: str, directory: Path):
    expected = {row.hf_key for row in backbone_rows}
    head_keys = {row.hf_key for row in _head_rows(family, bias=family.classifier_bias)}
    missing = sorted(expected - names.keys())
    unexpected = sorted(names[name] for name in names.keys() - expected - head_keys)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected {_listed(unexpected)}")
        raise ValueError(
            f"The weights in {directory} do not fit a {model_type!r} model with its config.json: "
            f"{'; '.join(problems)} (backbone keys are compared without the {family.hf_prefix!r} prefix). "
            "Check that config.json belongs to these weights."
        )


class RewardModel(nnx.Module):
    """A backbone and a linear reward head: ``rm(input_ids, attention_mask)`` → rewards.

    Build one with `from_pretrained` (a local Hugging Face directory) or `from_config` (random weights).

    Attributes:
      backbone: ``backbone(input_ids, attention_mask)`` → last hidden states [B, T, H].
      head: the float32 `RewardHead`.
      config: the Hugging Face config of the backbone.
      num_objectives: rewards per sequence.
      pooling: ``"last"`` or ``"first"``.
    """

    def __init__(
        self,
        config: transformers.PretrainedConfig,
        *,
        num_objectives: int = 1,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        pooling: str | None = None,
        head_bias: bool = False,
        rngs: nnx.Rngs | int,
    ):
        family = family_for(getattr(config, "model_type", None))
        pooling = family.default_pooling if pooling is None else pooling
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS} (or None for the family default), got {pooling!r}.")
        if not isinstance(num_objectives, int) or num_objectives < 1:
            raise ValueError(f"num_objectives must be a positive integer, got {num_objectives!r}.")
        rngs = _as_rngs(rngs)
        self.backbone = family.backbone(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.head = RewardHead(
            self.backbone.hidden_size,
            num_objectives,
            bias=head_bias,
            pooler=family.pooler is not None,
            initializer_range=float(getattr(config, "initializer_range", 0.02)),
            rngs=rngs,
        )
        self.num_objectives = num_objectives
        self.pooling = pooling
        #: The directory the model was loaded from; `save_pretrained` copies its tokenizer.
        self.source_dir: str | None = None
        self._config = _Static(config)

    @property
    def config(self) -> transformers.PretrainedConfig:
        return self._config.value

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Rewards [B] (or [B, num_objectives] when num_objectives > 1), float32, for token ids and mask [B, T]."""
        rewards = self.packed_rewards(input_ids, attention_mask, 1)
        return rewards[:, 0]

    def packed_rewards(self, input_ids: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
        """Rewards of packed rows: [B, M] (or [B, M, num_objectives]), float32, for M = ``num_segments``.

        Row b of ``input_ids`` [B, T] holds up to M sequences side by side, marked in ``segment_ids`` [B, T]
        (0 = padding, j ≥ 1 = the j-th sequence); entry [b, j − 1] is the reward of sequence j, exactly what
        `__call__` gives that sequence in a row of its own (entries of absent sequences are meaningless).
        Sequences attend only to themselves (a block-diagonal mask) and count positions from 0.

        Example (two sequences, ``5 6 7`` and ``8 9``, side by side in one row)::

            ids = jnp.array([[5, 6, 7, 8, 9, 0]])
            segments = jnp.array([[1, 1, 1, 2, 2, 0]])
            rm.packed_rewards(ids, segments, 2)  # ≈ [[rm([[5, 6, 7]], [[1, 1, 1]])[0], rm([[8, 9]], [[1, 1]])[0]]]
        """
        positions = pooled_positions(segment_ids, self.pooling, num_segments)
        # The backbone's last layer computes only the pooled rows: the same rewards, less work.
        pooled = self.backbone(input_ids, segment_ids, positions)
        rewards = self.head(pooled)
        return rewards[..., 0] if self.num_objectives == 1 else rewards

    @classmethod
    def from_config(
        cls,
        hf_config: transformers.PretrainedConfig,
        *,
        num_objectives: int = 1,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        pooling: str | None = None,
        head_bias: bool = False,
        rngs: nnx.Rngs | int,
    ) -> RewardModel:
        """A randomly initialised reward model of the architecture ``hf_config`` describes.

        Args:
          hf_config: a transformers config of a supported ``model_type`` (llama, qwen2, qwen3, mistral, bert).
          num_objectives: rewards per sequence (the head's output size).
          dtype: compute dtype of the backbone; the head always computes in float32.
          param_dtype: storage dtype of the backbone's parameters; the head's are float32.
          remat: recompute each layer in the backward pass (less memory, more compute).
          pooling: ``"last"``, ``"first"``, or None for the family's default (decoders last, BERT first).
          head_bias: give the score layer a bias.
          rngs: an `nnx.Rngs` or an integer seed.
        """
        return cls(
            hf_config,
            num_objectives=num_objectives,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            pooling=pooling,
            head_bias=head_bias,
            rngs=rngs,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        num_objectives: int = 1,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        pooling: str | None = None,
        head_bias: bool = False,
        rngs: nnx.Rngs | int | None = None,
    ) -> RewardModel:
        """Loads a reward model from a local Hugging Face model directory.

        The directory holds ``config.json`` and safetensors weights (``model.safetensors``, or shards named by
        ``model.safetensors.index.json``). A backbone checkpoint (``*ForCausalLM``, ``BertModel``) gets a
        freshly initialised head; a ``*ForSequenceClassification`` checkpoint brings its own, and then the
        checkpoint decides the number of objectives (its ``num_labels``) and whether the head has a bias.
        Other arguments are as in `from_config`; ``rngs`` (default: seed 0) initialises only what the
        checkpoint lacks.

        Raises:
          FileNotFoundError: ``path`` is not a local directory (jaxrm never downloads), or it lacks
            ``config.json`` or safetensors weights.
          ValueError: the ``model_type`` is not supported; weights are missing or unexpected (all are listed);
            a tensor's shape disagrees with the config; or ``num_objectives`` contradicts the checkpoint's head.
        """
        directory = model_dir(path)
        model_type = read_model_type(directory)
        family = family_for(model_type)
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        checkpoint = SafetensorsCheckpoint(directory)
        names = _checkpoint_names(family, checkpoint, directory)
        backbone_rows = family.param_table(config)
        _check_keys(family, names, backbone_rows, model_type, directory)

        classifier_key = f"{family.classifier}.weight"
        if classifier_key in names:
            num_labels = checkpoint[names[classifier_key]].shape[0]
            if num_objectives not in (1, num_labels):
                raise ValueError(
                    f"num_objectives={num_objectives} contradicts the checkpoint's reward head, which has {num_labels} "
                    f"output(s) ({names[classifier_key]!r}); leave num_objectives at its default to use the head."
                )
            num_objectives = num_labels
            head_bias = f"{family.classifier}.bias" in names

        options = dict(
            num_objectives=num_objectives, dtype=dtype, param_dtype=param_dtype, remat=remat,
            pooling=pooling, head_bias=head_bias,
        )  # fmt: skip
        # The backbone is built without values (the checkpoint provides them all); only the head is initialised.
        model = nnx.eval_shape(lambda: cls(config, **options, rngs=0))
        model.head = RewardHead(
            model.backbone.hidden_size,
            num_objectives,
            bias=head_bias,
            pooler=family.pooler is not None,
            initializer_range=float(getattr(config, "initializer_range", 0.02)),
            rngs=_as_rngs(0 if rngs is None else rngs),
        )
        tensors = RenamedKeys(checkpoint, names)
        load_params(model.backbone, tensors, backbone_rows)
        load_params(model, tensors, [row for row in _head_rows(family, bias=head_bias) if row.hf_key in names])
        if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model))):
            raise RuntimeError(f"The {model_type} parameter table does not cover every backbone parameter.")
        model.source_dir = str(directory)
        return model

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """Writes a transformers ``*ForSequenceClassification`` checkpoint that scores like this model.

        The directory gets ``config.json`` (architecture ``LlamaForSequenceClassification`` etc.,
        ``num_labels = num_objectives``, ``pad_token_id``, float32), ``model.safetensors`` (float32), and the
        tokenizer: ``tokenizer`` when given, else the one of the directory the model was loaded from.
        ``AutoModelForSequenceClassification.from_pretrained(directory)`` then scores like jaxrm, with the
        caveat on pad == EOS in the module docstring; `from_pretrained` reads it back, head included.

        Raises:
          ValueError: the model's pooling or head bias has no transformers equivalent (decoders pool
            ``"last"`` without head bias, BERT pools ``"first"``), or no pad token id can be found.
          FileExistsError: ``directory`` already holds a sharded checkpoint that transformers would read instead.
        """
        model_type = self.config.model_type
        family = family_for(model_type)
        architecture = family.architectures[model_type]
        if self.pooling != family.default_pooling:
            raise ValueError(
                f"{architecture} pools the {family.default_pooling} token, but this model pools "
                f"{self.pooling!r}; transformers could not score it the same way."
            )
        if self.head.score.use_bias and not family.classifier_bias:
            raise ValueError(
                f"{architecture}'s score layer has no bias, but this model's head has one; build the model with "
                "head_bias=False to export it to transformers."
            )
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        if (target / INDEX_FILE).exists():
            raise FileExistsError(
                f"{target} already holds a sharded checkpoint ({INDEX_FILE}) that transformers would read instead; "
                "save to another directory."
            )

        if tokenizer is None and self.source_dir is not None:
            if any((Path(self.source_dir) / name).is_file() for name in _TOKENIZER_FILES):
                tokenizer = load_tokenizer(self.source_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)

        config = copy.deepcopy(self.config)
        config.architectures = [architecture]
        config.num_labels = self.num_objectives
        config.pad_token_id = _pad_token_id(self.config, tokenizer)
        config.dtype = "float32"
        config.save_pretrained(target)

        tensors = {
            family.hf_prefix + key: value
            for key, value in export_params(self.backbone, family.param_table(self.config)).items()
        }
        for key, value in export_params(self, _head_rows(family, bias=self.head.score.use_bias)).items():
            # The pooler sits inside the backbone in transformers' BERT, the classifier beside it.
            in_backbone = family.pooler is not None and key.startswith(f"{family.pooler}.")
            tensors[family.hf_prefix + key if in_backbone else key] = value
        classifier_bias = f"{family.classifier}.bias"
        if family.classifier_bias and classifier_bias not in tensors:
            tensors[classifier_bias] = np.zeros((self.num_objectives,), np.float32)
        save_safetensors(tensors, target / WEIGHTS_FILE)


def _pad_token_id(config: transformers.PretrainedConfig, tokenizer) -> int:
    """The tokenizer's pad id, else the config's, else its (first) end-of-sequence id."""
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if getattr(config, "pad_token_id", None) is not None:
        return int(config.pad_token_id)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError(
            "The exported config needs a pad_token_id, and neither a tokenizer nor the config provides one; "
            "pass save_pretrained(..., tokenizer=...) or set model.config.pad_token_id."
        )
    return int(eos)
