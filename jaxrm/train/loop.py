"""``jaxrm train``: the loop that ties data → step → checkpoints → evaluation together.

:func:`train` is the whole job behind ``jaxrm train CONFIG``: build the tokenizer, model and data, lay
them on the mesh, resume from the run directory's latest checkpoint if there is one, run the jitted
train step with periodic logging, evaluation and checkpoints, and finish with a final evaluation,
checkpoint, plots and ``summary.json``. SIGTERM / SIGINT finish the current step, write a checkpoint
and return normally; running the same command again resumes exactly where the run stopped. Any other
exception that ends the loop first checkpoints the last completed step, and no checkpoint ever holds
non-finite parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.data.batching import default_buckets
from jaxrm.data.pipeline import training_batches
from jaxrm.data.sources import load_examples, split_holdout
from jaxrm.evaluate import preference_metrics, score_examples, write_evaluation_plots
from jaxrm.margins import example_margins
from jaxrm.train.checkpoint import Checkpointer, abstract_like
from jaxrm.train.config import Config, ConfigError, save_config
from jaxrm.train.mesh import batch_sharding, check_batch_divides, global_batch, make_mesh, on_mesh, replicated, state_shardings
from jaxrm.train.metrics_log import MetricsLog, plot_loss, summary_table
from jaxrm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxrm.train.run_dir import build_model, build_tokenizer, save_model_spec
from jaxrm.train.step import TrainState, jit_train_step, loss_kind, make_reward_step, split_model


class NonFiniteLossError(RuntimeError):
    """The loss or gradient of a step was NaN/inf and ``train.on_nonfinite`` is ``stop``."""


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (main thread only)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@jax.jit
def _finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _all_finite(tree) -> bool:
    """Whether every value of ``tree`` is finite: on the host where one process holds every value (no
    compilation, ~20 ms for MiniLM), otherwise as one jitted reduction that every process agrees on."""
    if jax.process_count() == 1:
        return all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(tree)))
    return bool(_finite(tree))


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def prepare_data(config: Config, tokenizer):
    """Tokenised train and eval examples with their margins, plus the data report of each."""
    train_examples, train_report = load_examples(config.data.train, config.data, tokenizer, split="train",
                                                 limit=config.data.limit)
    if config.data.eval is not None:
        eval_examples, eval_report = load_examples(config.data.eval, config.data, tokenizer, split="eval")
    elif config.data.train == "synthetic":
        eval_examples, eval_report = load_examples("synthetic", config.data, tokenizer, split="eval")
    else:
        train_examples, eval_examples, train_report, eval_report = split_holdout(
            train_examples, train_report, config.data.eval_fraction, config.train.seed)
    train_examples = with_margins(train_examples, config)
    check_data_fits_loss(train_examples, config)
    return train_examples, eval_examples, {"train": train_report, "eval": eval_report}


def with_margins(examples, config: Config):
    margins = example_margins(examples, config.loss.margin, scale=config.loss.margin_scale,
                              rating_margins=config.loss.rating_margins)
    return [dataclasses.replace(example, margin=float(margin)) for example, margin in zip(examples, margins)]


def check_data_fits_loss(examples, config: Config) -> None:
    kind = loss_kind(config.loss.name)
    if kind == "listwise":
        if config.loss.centering:
            raise ConfigError("loss.centering applies to pairs; with a listwise loss use loss.l2")
        return
    for example in examples:
        if len(example.sequences) != 2:
            raise ConfigError(f"loss.name={config.loss.name} needs two responses per record, but {example.source} "
                              f"has {len(example.sequences)}; use loss.name=all_pairs or plackett_luce for rankings")
        if kind == "pairwise" and list(example.ranks) != [0, 1]:
            raise ConfigError(f"loss.name={config.loss.name} needs strict preferences (chosen first), but "
                              f"{example.source} is a tie or prefers the second response; use loss.name=rao_kupper "
                              "or davidson for data with ties")


def evaluate_params(reward_step, params, examples, config: Config, buckets, pad_id, mesh):
    rewards = score_examples(reward_step, params, examples, batch_size=config.train.batch_size,
                             buckets=buckets, pad_id=pad_id, mesh=mesh,
                             sequences_per_row=config.data.sequences_per_row)
    return rewards, preference_metrics(rewards, examples, config.loss)


def train(config: Config) -> dict:
    """Trains (or resumes) the run of ``config``; returns the summary also written to ``summary.json``."""
    if config.mesh.distributed:
        # CPU devices of several processes talk through gloo; the option affects nothing but CPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(config.mesh.coordinator_address, config.mesh.num_processes,
                                   config.mesh.process_id)
    started = time.perf_counter()
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    tokenizer = build_tokenizer(config)
    model = build_model(config, tokenizer)
    train_examples, eval_examples, reports = prepare_data(config, tokenizer)
    for split, report in reports.items():
        for warning in dict.fromkeys(report.warnings):
            _log(f"{split} data: warning: {warning}")
    buckets = config.data.buckets or default_buckets(config.data.max_length)

    mesh = make_mesh(config.mesh)
    check_batch_divides(config.train.batch_size, mesh, config.train.grad_accum_steps)
    reward_fn, params = split_model(model)
    params = jax.device_put(params, state_shardings(params, mesh))
    optimizer, schedule = make_optimizer(config.train), learning_rate_schedule(config.train)
    state = on_mesh(TrainState(jnp.zeros((), jnp.int32), params, jax.jit(optimizer.init)(params)), mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)

    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
    batches, plan = training_batches(
        train_examples, batch_size=config.train.batch_size, seed=config.train.seed, buckets=buckets,
        pad_id=tokenizer.pad_token_id, length_group_batches=config.data.length_group_batches,
        balance_group_batches=config.data.balance_group_batches,
        sequences_per_row=config.data.sequences_per_row, micro_batches=config.train.grad_accum_steps,
        row_shards=mesh.shape["data"] * mesh.shape["fsdp"], process_index=jax.process_index(), process_count=jax.process_count(),
    )
    resumed_from = checkpointer.latest_step()
    skipped = {"steps": 0, "records": 0}
    if resumed_from is not None:
        state, data_state = checkpointer.restore(resumed_from, abstract_like(state, state_sharding))
        batches.set_state(data_state["iterator"])
        skipped = data_state["skipped"]
        _log(f"resuming {run_dir} from step {resumed_from}")
    if is_main:
        save_config(config, run_dir / "config.yaml")
        save_model_spec(run_dir, model, tokenizer)

    train_step = jit_train_step(reward_fn, optimizer, config.loss, state_sharding=state_sharding,
                                batch_sharding=batch_sharding(mesh), replicated=replicated(mesh),
                                grad_accum_steps=config.train.grad_accum_steps)
    reward_step = jax.jit(make_reward_step(reward_fn), out_shardings=replicated(mesh))
    log = MetricsLog(run_dir, enabled=is_main)
    log.forget_after(int(state.step))
    step = int(state.step)
    eval_metrics, eval_rewards, stopped_by = None, None, None
    # The data position that goes with ``state``: it moves on only when a step has completed.
    position = batches.get_state()

    def save(**options) -> None:
        """Checkpoints ``state`` (unless this step is saved already); refuses non-finite parameters."""
        if checkpointer.latest_step() == step and options.get("force"):
            return
        if not _all_finite(state.params):
            raise NonFiniteLossError(f"step {step}: the parameters hold NaN or inf, so no checkpoint was written; "
                                     f"the last good checkpoint is step {checkpointer.latest_step()}. Lower "
                                     "train.learning_rate (or raise train.warmup_steps)")
        checkpointer.save(step, state, {"iterator": position, "skipped": dict(skipped)}, **options)

    window = _LogWindow()

    progress = _Progress(config, step)
    with _StopRequest() as stop, progress:
        try:
            while step < config.train.steps and stop.signal_name is None:
                data_position = position["next_index"]
                local = next(batches)
                state, metrics = train_step(state, global_batch(local, mesh))
                metrics = jax.device_get(metrics)
                step += 1
                position = batches.get_state()
                window.add(local, metrics)
                if metrics["nonfinite"]:
                    sources = [train_examples[i].source for i in plan(data_position) if i >= 0]
                    message = (f"step {step}: non-finite loss or gradient (loss={metrics['loss']}) on batch "
                               f"{data_position} (records {', '.join(sources[:4])}{', …' if len(sources) > 4 else ''})")
                    skipped["steps"] += 1
                    skipped["records"] += len(sources)
                    if config.train.on_nonfinite == "stop":
                        save(force=True)
                        checkpointer.wait()
                        raise NonFiniteLossError(message + f"; the update was not applied and the last good "
                                                 f"parameters are checkpointed as step {step}. Set "
                                                 "train.on_nonfinite=skip to skip such batches, or lower "
                                                 "train.learning_rate")
                    _log(message + "; batch skipped")
                if step % config.train.log_every == 0 or step == config.train.steps:
                    logged = {**window.flush(), "learning_rate": float(schedule(step))}
                    log.write(step, "train", logged)
                    progress.report(step, logged)
                progress.update(1)
                checkpoint_metrics = None
                if config.train.eval_every and step % config.train.eval_every == 0 and step < config.train.steps:
                    eval_rewards, eval_metrics = evaluate_params(reward_step, state.params, eval_examples, config,
                                                                 buckets, tokenizer.pad_token_id, mesh)
                    log.write(step, "eval", eval_metrics)
                    checkpoint_metrics = {"accuracy": eval_metrics["accuracy"]}
                if step % config.train.checkpoint_every == 0 and step < config.train.steps:
                    save(metrics=checkpoint_metrics)
        except BaseException as error:
            # Nothing is lost: whatever stopped the loop, the last completed step is checkpointed.
            if not isinstance(error, NonFiniteLossError) and not any(
                    leaf.is_deleted() for leaf in jax.tree.leaves(state)):
                save(force=True)
            checkpointer.wait()
            raise
        stopped_by = stop.signal_name

    if stopped_by is not None:
        save(force=True)
        checkpointer.wait()
        checkpointer.close()
        log.close()
        _log(f"{stopped_by} received: stopped after step {step}, checkpoint written to {run_dir / 'checkpoints'}. "
             f"Resume with: jaxrm train {run_dir / 'config.yaml'}")
        return {"stopped_by": stopped_by, "step": step, "output_dir": str(run_dir)}

    eval_rewards, eval_metrics = evaluate_params(reward_step, state.params, eval_examples, config, buckets,
                                                 tokenizer.pad_token_id, mesh)
    log.write(step, "eval", eval_metrics)
    save(metrics={"accuracy": eval_metrics["accuracy"]}, force=True)
    checkpointer.wait()
    checkpointer.close()

    summary = {
        **eval_metrics,
        "step": step,
        "resumed_from": resumed_from,
        "skipped_steps": skipped["steps"],
        "wall_time_s": time.perf_counter() - started,
        "compute_dtype": jnp.dtype(model.backbone.dtype).name,  # as built: model.dtype with auto resolved
        **{f"train_{k}": v for k, v in window.run_rates().items()},
        "data": {split: {**report.as_dict(), "skipped": skipped["records"] if split == "train" else 0}
                 for split, report in reports.items()},
        "output_dir": str(run_dir),
    }
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        with _private_matplotlib_cache():
            plot_loss(run_dir, log)
            write_evaluation_plots(eval_rewards, eval_examples, run_dir / "plots")
        print(summary_table({k: v for k, v in summary.items() if k != "data"}))
        for split, counts in summary["data"].items():
            print(f"{split} data: {counts['records']} records from {counts['source']}, {counts['truncated']} "
                  f"truncated, {counts['identical_pairs']} with identical responses, {counts['skipped']} skipped "
                  "(in batches with a non-finite loss)")
    log.close()
    return summary


@contextlib.contextmanager
def _private_matplotlib_cache():
    """Matplotlib keeps a font cache in ``~/.cache``; a run writes nothing outside its directory unless
    asked to (``MPLCONFIGDIR`` set by the user), so the cache lives in a temporary directory meanwhile."""
    if "MPLCONFIGDIR" in os.environ or "matplotlib" in sys.modules:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="jaxrm-matplotlib-") as directory:
        os.environ["MPLCONFIGDIR"] = directory
        try:
            yield
        finally:
            del os.environ["MPLCONFIGDIR"]


class _LogWindow:
    """Train metrics averaged over the steps since the last log line, with real examples and real
    (non-padding) tokens per second; plus the run's steady-state rates (every step after the first,
    which carries the compilation)."""

    def __init__(self):
        self._reset()
        self.run_examples = self.run_tokens = 0
        self.run_since = None

    def _reset(self):
        self.sums, self.steps, self.examples, self.tokens = {}, 0, 0, 0
        self.since = time.perf_counter()

    def add(self, local_batch, metrics: dict) -> None:
        examples = int(local_batch.example_mask.sum()) * jax.process_count()
        tokens = local_batch.num_tokens * jax.process_count()
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps += 1
        self.examples += examples
        self.tokens += tokens
        if self.run_since is None:
            self.run_since = time.perf_counter()
        else:
            self.run_examples += examples
            self.run_tokens += tokens

    def flush(self) -> dict:
        elapsed = time.perf_counter() - self.since
        means = {key: total / max(self.steps, 1) for key, total in self.sums.items()}
        means["nonfinite"] = self.sums.get("nonfinite", 0.0)
        means.update(examples_per_s=self.examples / elapsed, tokens_per_s=self.tokens / elapsed)
        self._reset()
        return means

    def run_rates(self) -> dict:
        elapsed = time.perf_counter() - self.run_since if self.run_since is not None else 0.0
        if not self.run_examples or elapsed <= 0:
            return {"examples_per_s": None, "tokens_per_s": None}
        return {"examples_per_s": self.run_examples / elapsed, "tokens_per_s": self.run_tokens / elapsed}


class _Progress:
    """A tqdm bar (loss, accuracy, pairs/s) on a terminal; a plain log line every log step otherwise."""

    def __init__(self, config: Config, step: int):
        from tqdm.auto import tqdm

        self.enabled = config.train.progress and jax.process_index() == 0
        self.bar = tqdm(total=config.train.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (self.enabled and sys.stderr.isatty()))

    def report(self, step: int, metrics: dict) -> None:
        text = dict(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                    pairs_s=f"{metrics['examples_per_s']:.1f}")
        if not self.bar.disable:
            self.bar.set_postfix(text, refresh=False)
        elif self.enabled:
            print(f"step {step}: " + " ".join(f"{k}={v}" for k, v in text.items()), file=sys.stderr, flush=True)

    def update(self, count: int = 1) -> None:
        self.bar.update(count)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
