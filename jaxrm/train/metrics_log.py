"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard events, the loss plot and a summary table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class MetricsLog:
    """Appends ``{"step", "split", ...}`` lines to ``metrics.jsonl`` and mirrors them to TensorBoard."""

    def __init__(self, run_dir: Path, *, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        scalars = flat_scalars(metrics)
        with self.path.open("a") as file:
            file.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
        for key, value in scalars.items():
            self._tensorboard.add_scalar(f"{split}/{key}", value, step)

    def forget_after(self, step: int) -> None:
        """Drops lines logged after ``step``: a resumed run redoes those steps from its checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def read(self, split: str) -> list[dict]:
        if not self.path.exists():
            return []
        lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [line for line in lines if line["split"] == split]

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def flat_scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numbers of a (nested) metrics dict, keyed ``outer/inner``; text and missing values left out."""
    scalars = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            scalars.update(flat_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float, np.number)) or (isinstance(value, np.ndarray) and value.ndim == 0):
            scalars[prefix + key] = float(value)
    return scalars


def plot_loss(run_dir: Path, log: MetricsLog) -> Path:
    """``plots/loss.png``: train and eval loss by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4))
    for split in ("train", "eval"):
        points = [(line["step"], line["loss"]) for line in log.read(split) if "loss" in line]
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, marker="o" if split == "eval" else None, label=split)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(plots / "loss.png", dpi=100)
    plt.close(figure)
    return plots / "loss.png"


def summary_table(summary: dict) -> str:
    """A two-column text table of the scalar entries of ``summary``."""
    rows = [(key, value) for key, value in summary.items() if isinstance(value, str)]
    rows = list(flat_scalars(summary).items()) + rows
    width = max(len(key) for key, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in rows:
        if isinstance(value, float):
            text = str(int(value)) if value.is_integer() else f"{value:.4f}"
        else:
            text = str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
