"""Using a trained reward model: evaluate it, score a file, export it to Hugging Face format.

Each function takes a run directory (its best checkpoint by default) or a Hugging Face model
directory, reads data with the same tokenisation as training, and runs on every local device.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from jaxrm.data.batching import default_buckets
from jaxrm.data.sources import load_examples
from jaxrm.evaluate import preference_metrics, score_examples
from jaxrm.train.config import Config, DataConfig, LossConfig
from jaxrm.train.mesh import make_mesh, replicated
from jaxrm.train.config import MeshConfig
from jaxrm.train.run_dir import load_reward_model
from jaxrm.train.step import make_reward_step, split_model


def _scoring_setup(model_or_run, *, max_length, batch_size, checkpoint):
    model, tokenizer, config = load_reward_model(model_or_run, checkpoint=checkpoint)
    data_config = config.data if config is not None else DataConfig()
    if max_length is not None:
        data_config = _replace(data_config, max_length=max_length)
    devices = jax.device_count()
    batch_size = batch_size or (config.train.batch_size if config is not None else 16)
    batch_size = -(-batch_size // devices) * devices
    mesh = make_mesh(MeshConfig())
    reward_fn, params = split_model(model)
    params = jax.device_put(params, replicated(mesh))
    reward_step = jax.jit(make_reward_step(reward_fn), out_shardings=replicated(mesh))
    buckets = default_buckets(data_config.max_length)
    return config, tokenizer, data_config, batch_size, mesh, params, reward_step, buckets


def _replace(data_config: DataConfig, **changes) -> DataConfig:
    import dataclasses

    return dataclasses.replace(data_config, buckets=None, **changes)


def evaluate_model(model_or_run, data: str, *, max_length=None, batch_size=None, checkpoint="best") -> dict:
    """The evaluation report (:func:`jaxrm.evaluate.preference_metrics`) of a run or model on ``data``."""
    config, tokenizer, data_config, batch_size, mesh, params, reward_step, buckets = _scoring_setup(
        model_or_run, max_length=max_length, batch_size=batch_size, checkpoint=checkpoint)
    examples, report = load_examples(data, data_config, tokenizer, split="eval")
    rewards = score_examples(reward_step, params, examples, batch_size=batch_size, buckets=buckets,
                             pad_id=tokenizer.pad_token_id, mesh=mesh)
    loss_config = config.loss if isinstance(config, Config) else LossConfig()
    metrics = preference_metrics(rewards, examples, _eval_loss(loss_config))
    metrics["n_truncated"] = report.n_truncated
    return metrics


def _eval_loss(loss_config: LossConfig) -> LossConfig:
    """Evaluation reports the plain loss of the run's loss family, without training-time margins."""
    import dataclasses

    return dataclasses.replace(loss_config, margin="none", centering=0.0, l2=0.0)


def score_file(model_or_run, data: str, out: str | Path, *, max_length=None, batch_size=None,
               checkpoint="best") -> int:
    """Writes ``{"source", "rewards": [...]}`` per record (in input order) to ``out``; returns the count."""
    config, tokenizer, data_config, batch_size, mesh, params, reward_step, buckets = _scoring_setup(
        model_or_run, max_length=max_length, batch_size=batch_size, checkpoint=checkpoint)
    examples, _ = load_examples(data, data_config, tokenizer, split="eval")
    rewards = score_examples(reward_step, params, examples, batch_size=batch_size, buckets=buckets,
                             pad_id=tokenizer.pad_token_id, mesh=mesh)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as file:
        for example, row in zip(examples, rewards):
            values = [float(value) for value in row[: len(example.sequences)]]
            file.write(json.dumps({"source": example.source, "rewards": values}) + "\n")
    return len(examples)


def export_run(run: str | Path, out: Path, *, checkpoint: str = "best") -> Path:
    """Saves a run's model as a Hugging Face ``*ForSequenceClassification`` directory (safetensors)."""
    model, tokenizer, _ = load_reward_model(run, checkpoint=checkpoint)
    model.save_pretrained(out, tokenizer=tokenizer)
    return out
