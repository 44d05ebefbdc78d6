"""Orbax checkpoints of a run: train state (params, optimizer, step) and the data position, together.

Policy: a save every ``checkpoint_every`` steps and at the end, written asynchronously; the last
``keep`` checkpoints are kept, and so is the best by eval accuracy. Orbax writes into a temporary
directory and renames it when complete, so a process killed mid-save leaves the previous checkpoint
as the latest one: an incomplete checkpoint is never listed, never loaded.

Restoring takes the *target* shardings, so a run saved on one mesh restores onto any other mesh or
device count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class _NoMetricsNotice(logging.Filter):
    """Periodic saves between evaluations carry no metrics by design; orbax warns about each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsNotice())


def _accuracy(metrics) -> float:
    return float(metrics["accuracy"])


class Checkpointer:
    """Saves and restores ``(train_state, data_state)`` pairs under ``directory``."""

    def __init__(self, directory: str | Path, *, keep: int = 2, asynchronous: bool = True):
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(keep),
                policies.BestN(get_metric_fn=_accuracy, n=1, keep_checkpoints_without_metrics=False),
            ]),
            best_fn=_accuracy,
            best_mode="max",
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=("state", "data"))

    def save(self, step: int, state, data_state: dict, *, metrics: dict | None = None, force: bool = False) -> bool:
        """Starts saving (async); returns whether a checkpoint was started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            metrics=metrics,
            force=force,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def restore(self, step: int, abstract_state):
        """Restores ``step`` onto the shardings of ``abstract_state`` (a tree of ``jax.ShapeDtypeStruct``)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree, shardings):
    """``jax.ShapeDtypeStruct`` leaves with the given shardings (the restore target)."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        tree, shardings)
