"""Using trained reward models: evaluate, score a file, estimate margins, export to Hugging Face format.

Each function takes a run directory (its best checkpoint by default) or a Hugging Face model
directory — or several, as a list or one comma-separated string, for an ensemble
(:mod:`jaxrm.ensemble`) — reads data with the same tokenisation as training, and runs on every
local device. Each member reads the data with its own tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxrm.data.batching import default_buckets
from jaxrm.data.readers import iter_raw_records
from jaxrm.data.records import DataError
from jaxrm.data.sources import load_examples
from jaxrm.ensemble import combine_rewards, member_disagreement
from jaxrm.evaluate import ordered_pairs, preference_metrics, score_examples, write_evaluation_plots
from jaxrm.margins import reference_margins
from jaxrm.train.config import Config, DataConfig, LossConfig, MeshConfig
from jaxrm.train.mesh import make_mesh, replicated
from jaxrm.train.run_dir import load_reward_model
from jaxrm.train.step import make_reward_step, split_model


def score_model(model_or_run, data: str, *, max_length=None, batch_size=None, checkpoint="best"):
    """One model's rewards on ``data``: ``(rewards [N, K], examples, config, report)``.

    ``config`` is the run's :class:`Config` (``None`` for a Hugging Face directory); the run's data
    settings (max length, truncation) apply unless ``max_length`` overrides them.
    """
    model, tokenizer, config = load_reward_model(model_or_run, checkpoint=checkpoint)
    data_config = config.data if config is not None else DataConfig()
    if max_length is not None:
        data_config = dataclasses.replace(data_config, max_length=max_length, buckets=None)
    devices = jax.device_count()
    batch_size = batch_size or (config.train.batch_size if config is not None else 16)
    batch_size = -(-batch_size // devices) * devices
    mesh = make_mesh(MeshConfig())
    reward_fn, params = split_model(model)
    params = jax.device_put(params, replicated(mesh))
    reward_step = jax.jit(make_reward_step(reward_fn), out_shardings=replicated(mesh))
    examples, report = load_examples(data, data_config, tokenizer, split="eval")
    rewards = score_examples(reward_step, params, examples, batch_size=batch_size,
                             buckets=data_config.buckets or default_buckets(data_config.max_length),
                             pad_id=tokenizer.pad_token_id, mesh=mesh,
                             sequences_per_row=data_config.sequences_per_row)
    return rewards, examples, config, report


def model_list(models: str | Path | Sequence[str | Path]) -> list[str]:
    """``"a,b"``, ``"a"`` or ``["a", "b"]`` → ``["a", "b"]``."""
    if isinstance(models, (str, Path)):
        models = str(models).split(",")
    names = [str(model).strip() for model in models if str(model).strip()]
    if not names:
        raise ValueError("no model given; pass a run or model directory (several: comma-separated)")
    return names


def score_members(models, data: str, *, max_length=None, batch_size=None, checkpoint="best"):
    """Every member's rewards on ``data``: ``(rewards [M, N, K], examples, configs, report)``.

    ``examples`` and ``report`` are the first member's (every member reads the same records in the
    same order, with its own tokenizer).
    """
    member_rewards, configs, examples, report = [], [], None, None
    for model in model_list(models):
        rewards, member_examples, config, member_report = score_model(
            model, data, max_length=max_length, batch_size=batch_size, checkpoint=checkpoint)
        if examples is not None and len(member_examples) != len(examples):
            raise DataError(f"{data}: {model} read {len(member_examples)} records but {model_list(models)[0]} read "
                            f"{len(examples)}")
        member_rewards.append(rewards)
        configs.append(config)
        if examples is None:
            examples, report = member_examples, member_report
    width = max(rewards.shape[1] for rewards in member_rewards)
    stacked = np.stack([np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=np.nan) for r in member_rewards])
    return stacked, examples, configs, report


def evaluate_model(model_or_run, data: str, *, max_length=None, batch_size=None, checkpoint="best",
                   ensemble: str = "mean", uncertainty_penalty: float = 1.0, plots_dir: str | Path | None = None,
                   sections=None) -> dict:
    """The evaluation report (:func:`jaxrm.evaluate.preference_metrics`) of a run, model or ensemble on ``data``.

    Several models are combined with ``ensemble`` (``mean``, ``min``, ``uncertainty`` with λ =
    ``uncertainty_penalty``); the report then also has ``ensemble`` (method, members, each member's
    accuracy, mean disagreement). ``plots_dir``: write the reliability diagram and reward
    histograms there (nothing is written without it).
    """
    member_rewards, examples, configs, report = score_members(
        model_or_run, data, max_length=max_length, batch_size=batch_size, checkpoint=checkpoint)
    several = len(member_rewards) > 1
    rewards = combine_rewards(member_rewards, ensemble, penalty=uncertainty_penalty) if several else member_rewards[0]
    loss_config = configs[0].loss if isinstance(configs[0], Config) else LossConfig()
    metrics = preference_metrics(rewards, examples, loss_config, sections=sections)
    metrics["n_truncated"] = report.n_truncated
    if several:
        spread = member_disagreement(member_rewards)
        metrics["ensemble"] = {
            "method": ensemble,
            "members": len(member_rewards),
            **({"uncertainty_penalty": uncertainty_penalty} if ensemble == "uncertainty" else {}),
            "member_accuracy": [float(np.mean(ordered_pairs(np.nan_to_num(member), examples)["gap"] > 0))
                                for member in member_rewards],
            "mean_reward_std": float(np.nanmean(spread[~np.isnan(rewards)])),
        }
    if plots_dir is not None:
        write_evaluation_plots(rewards, examples, plots_dir, title=Path(data).name)
    return metrics


def score_file(model_or_run, data: str, out: str | Path, *, max_length=None, batch_size=None,
               checkpoint="best", ensemble: str = "mean", uncertainty_penalty: float = 1.0) -> int:
    """Writes ``{"source", "rewards": [...]}`` per record (in input order) to ``out``; returns the count.

    With several models, ``rewards`` are combined by ``ensemble`` and each line also has
    ``reward_std``, the members' disagreement per response.
    """
    member_rewards, examples, _, _ = score_members(model_or_run, data, max_length=max_length,
                                                   batch_size=batch_size, checkpoint=checkpoint)
    several = len(member_rewards) > 1
    rewards = combine_rewards(member_rewards, ensemble, penalty=uncertainty_penalty) if several else member_rewards[0]
    spread = member_disagreement(member_rewards)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as file:
        for index, example in enumerate(examples):
            count = len(example.sequences)
            line = {"source": example.source, "rewards": [float(value) for value in rewards[index, :count]]}
            if several:
                line["reward_std"] = [float(value) for value in spread[index, :count]]
            file.write(json.dumps(line) + "\n")
    return len(examples)


def estimate_margin_file(model_or_runs, data: str, out: str | Path, *, scale: float = 1.0,
                         max_margin: float | None = 3.0, max_length=None, batch_size=None,
                         checkpoint="best") -> dict:
    """``jaxrm margins estimate``: copies the pairwise records of ``data`` to ``out`` (JSONL) with a
    reference ``margin`` and ``margin_std`` (:func:`jaxrm.margins.reference_margins`) on each.

    Every other field is kept as it was (an existing ``margin`` is replaced). Train on ``out`` with
    ``loss.margin=data``. Returns a summary: pairs, members, mean margin, share of pairs the
    references think are swapped (mean gap < 0, margin 0).
    """
    if str(data) == "synthetic":
        raise DataError("synthetic: margins estimate needs a file; write the synthetic records to JSONL first "
                        "(jaxrm.data.synthetic.write_jsonl)")
    member_rewards, examples, _, _ = score_members(model_or_runs, data, max_length=max_length,
                                                   batch_size=batch_size, checkpoint=checkpoint)
    for example in examples:
        if len(example.sequences) != 2 or list(example.ranks) != [0, 1]:
            raise DataError(f"{example.source}: margins estimate needs pairwise records (chosen, rejected); "
                            "this one is a ranking or a tie")
    gaps = member_rewards[:, :, 0].astype(np.float64) - member_rewards[:, :, 1]
    margins, spread = reference_margins(gaps, scale=scale, max_margin=max_margin)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out.open("w", encoding="utf-8") as file:
        for (raw, _), margin, std in zip(iter_raw_records(data), margins, spread):
            raw = dict(raw)
            raw["margin"], raw["margin_std"] = float(margin), float(std)
            file.write(json.dumps(raw, ensure_ascii=False) + "\n")
            written += 1
    if written != len(examples):
        raise DataError(f"{data}: read {len(examples)} records to score but {written} to copy; is it changing?")
    return {"pairs": written, "members": len(member_rewards), "mean_margin": float(margins.mean()),
            "mean_margin_std": float(spread.mean()), "share_swapped": float(np.mean(gaps.mean(axis=0) < 0)),
            "out": str(out)}


def export_run(run: str | Path, out: Path, *, checkpoint: str = "best") -> Path:
    """Saves a run's model as a Hugging Face ``*ForSequenceClassification`` directory (safetensors)."""
    model, tokenizer, _ = load_reward_model(run, checkpoint=checkpoint)
    model.save_pretrained(out, tokenizer=tokenizer)
    return out
