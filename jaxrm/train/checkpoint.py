"""Orbax checkpoints of a run: train state (params, optimizer, step) and the data position, together.

Policy: a save every ``checkpoint_every`` steps and at the end, written asynchronously; the last
``keep`` checkpoints are kept, and so is the best by eval accuracy. Orbax writes into a temporary
directory and renames it when complete, so a process killed mid-save leaves the previous checkpoint
as the latest one: an incomplete checkpoint is never listed, never loaded.

Restoring takes the *target* shardings, so a run saved on one mesh restores onto any other mesh or
device count. Before restoring, the saved shapes are compared with the target's, so a checkpoint of a
different model fails naming the parameter instead of deep inside Orbax.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxrm.train.config import ConfigError


class CheckpointMismatchError(ConfigError):
    """A checkpoint holds a different model (other parameter names or shapes) than the one configured."""


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
        self.directory = Path(directory).absolute()
        # Handlers given up front (not only through save/restore args) so that metadata can be read
        # before a restore, to check shapes.
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
        )

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
        """Restores ``step`` onto the shardings of ``abstract_state`` (a tree of ``jax.ShapeDtypeStruct``).

        Raises:
          CheckpointMismatchError: the checkpoint's parameters differ in name or shape from the target's.
        """
        self.check_matches(step, abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["data"]

    def check_matches(self, step: int, abstract_state) -> None:
        """Compares the saved tree of ``step`` with ``abstract_state``: same leaves, same shapes."""
        saved = _shapes_by_path(self.manager.item_metadata(step)["state"])
        target = _shapes_by_path(abstract_state)
        problems = []
        for path in sorted(target.keys() | saved.keys(), key=_params_first):
            if path not in saved:
                problems.append(f"{path} is not in the checkpoint")
            elif path not in target:
                problems.append(f"{path} is in the checkpoint but not in the configured model")
            elif tuple(saved[path]) != tuple(target[path]):
                problems.append(f"{path} has shape {tuple(saved[path])} in the checkpoint but "
                                f"{tuple(target[path])} in the configured model")
        if problems:
            more = f" (and {len(problems) - 3} more differences)" if len(problems) > 3 else ""
            raise CheckpointMismatchError(
                f"{self.directory / str(step)} holds a different model: {'; '.join(problems[:3])}{more}. "
                "A run directory resumes only the model it was started with: use a new output_dir for a new "
                "model, or restore the run's own model settings (see its config.yaml)"
            )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
    """``{"params/backbone/…/kernel": shape}`` for a train state, its abstract form, or Orbax metadata."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
        # nnx variables add a trailing "value" level in saved metadata; it is no part of the name.
        if names and names[-1] == "value":
            names.pop()
        shapes["/".join(names)] = tuple(getattr(leaf, "shape", ()))
    return shapes


def _params_first(path: str) -> tuple[bool, str]:
    return (not path.startswith("params/"), path)


def abstract_like(tree, shardings):
    """``jax.ShapeDtypeStruct`` leaves with the given shardings (the restore target)."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        tree, shardings)
