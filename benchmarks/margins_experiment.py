"""What do margins do? Five margin sources and a control × three seeds on synthetic preferences with a known true reward.

    .venv/bin/python benchmarks/margins_experiment.py --out benchmarks/RESULTS.md

The data is :class:`jaxrm.data.synthetic.SyntheticTask` pairs: labels are Bradley–Terry draws on the
true rewards, and each pair carries a Llama 2 rating that buckets its true gap |r₁ − r₂| into
quartiles. Every condition trains the same small Qwen3-style model from the same initial weights
(one set per seed) on the same records, and is evaluated on the same held-out pairs:

1. ``none``: plain Bradley–Terry;
2. ``rating small``: Llama 2's small map {0, 1/3, 2/3, 1};
3. ``rating large``: Llama 2's large map {0, 1, 2, 3};
4. ``reference``: ``jaxrm margins estimate`` with the three ``none`` models as an ensemble writes a
   margin (mean reward gap, clipped to [0, 3]) into the training data; train on it with
   ``loss.margin=data``;
5. ``confidence``: the online margin m = 1 · max(0, tanh(sg(Δ)/2)), warmed up over the first 20 % of steps;
6. ``constant 0.5`` (a control): the same margin for every pair, the mean of the small map over the
   four equally common ratings. It carries no information about which pairs are strong, so what it
   changes is what any margin does to the loss's saturation, not what the margin's source knows.

It writes a Markdown table (mean ± std over seeds): accuracy overall and per rating bucket, Spearman
with the true reward, ECE of σ(Δ), mean Δ and the share of pairs with Δ > 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxrm.data.records import RATING_LEVELS
from jaxrm.data.synthetic import SyntheticTask, write_jsonl
from jaxrm.inference import estimate_margin_file
from jaxrm.train.config import ModelConfig, config_from_dict
from jaxrm.train.loop import train

MODEL = {
    "model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
}

CONDITIONS = {
    "none": {"loss.margin": "none"},
    "rating small": {"loss.margin": "rating", "loss.rating_margins": "small"},
    "rating large": {"loss.margin": "rating", "loss.rating_margins": "large"},
    "reference": {"loss.margin": "data"},
    "confidence": {"loss.margin": "confidence", "loss.margin_scale": 1.0},
    "constant 0.5": {"loss.margin": "rating", "loss.rating_margins": "[0.5, 0.5, 0.5, 0.5]"},
}


def write_data(work: Path, n_train: int, n_eval: int, task: SyntheticTask) -> tuple[Path, Path]:
    train_path = write_jsonl(task.pairs(n_train, seed=1, ratings=True), work / "train.jsonl")
    eval_path = write_jsonl(task.pairs(n_eval, seed=2, ratings=True), work / "eval.jsonl")
    return train_path, eval_path


def initial_weights(work: Path, seed: int, task: SyntheticTask) -> Path:
    """The seed's random initial model as a Hugging Face directory: every condition starts from it."""
    from flax import nnx

    from jaxrm.models import RewardModel
    from jaxrm.train.run_dir import hf_config_for

    tokenizer = task.tokenizer()
    with nnx.use_eager_sharding(False):
        model = RewardModel.from_config(hf_config_for(ModelConfig(config=MODEL), tokenizer), rngs=nnx.Rngs(seed))
    directory = work / f"init-seed{seed}"
    model.save_pretrained(directory, tokenizer=tokenizer)
    return directory


def run(work: Path, name: str, seed: int, init: Path, train_path: Path, eval_path: Path, args,
        overrides: dict) -> dict:
    raw = {
        "model": {"path": str(init)},
        "data": {"train": str(train_path), "eval": str(eval_path), "max_length": 32},
        "train": {"batch_size": 64, "steps": args.steps, "learning_rate": 3e-3, "warmup_steps": args.steps // 10,
                  "weight_decay": 0.01, "seed": seed, "log_every": args.steps, "eval_every": 0,
                  "checkpoint_every": 10 * args.steps, "progress": False},
        "output_dir": str(work / f"{name.replace(' ', '-')}-seed{seed}"),
    }
    overrides = dict(overrides)
    if overrides.get("loss.margin") == "confidence":
        overrides["loss.confidence_warmup_steps"] = args.steps // 5
    config = config_from_dict(raw, [f"{key}={value}" for key, value in overrides.items()])
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(config)
    print(f"{name:>13} seed {seed}: accuracy {summary['accuracy']:.4f}  spearman "
          f"{summary['spearman_true_reward']:.4f}  ece {summary['ece']:.4f}  ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr, flush=True)
    return summary


COLUMNS = [("accuracy", "acc")] + [(f"rating:{level}", level.replace(" better", "")) for level in RATING_LEVELS[::-1]] + [
    ("spearman_true_reward", "Spearman true r"), ("ece", "ECE"), ("mean_margin", "mean Δ"),
    ("share_gap_above_1", "Δ > 1"), ("length_spearman", "ρ(reward, length)"),
]


def value(summary: dict, key: str) -> float:
    if key.startswith("rating:"):
        return summary["accuracy_by_rating"][key.split(":", 1)[1]]
    return summary[key]


def oracle_row(eval_path: Path) -> str:
    """The true reward scored like a model: the ceiling that BT-sampled labels allow."""
    from jaxrm.calibration import expected_calibration_error

    records = [json.loads(line) for line in eval_path.read_text().splitlines()]
    gaps = np.array([record["true_rewards"][0] - record["true_rewards"][1] for record in records])
    ratings = np.array([record["rating"] for record in records])
    cells = [f"{np.mean(gaps > 0):.3f}"] + [f"{np.mean(gaps[ratings == level] > 0):.3f}" for level in RATING_LEVELS[::-1]]
    cells += ["1", f"{expected_calibration_error(gaps):.3f}", f"{gaps.mean():.3f}", f"{np.mean(gaps > 1):.3f}", "–"]
    return "| true reward (oracle) | " + " | ".join(cells) + " |"


def table(results: dict[str, list[dict]]) -> str:
    header = "| margin | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, summaries in results.items():
        cells = []
        for key, _ in COLUMNS:
            values = np.array([value(summary, key) for summary in summaries])
            cells.append(f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="Markdown results file (default: print only)")
    parser.add_argument("--work-dir", type=Path, help="runs and data go here (default: a temporary directory)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=1000)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jaxrm-margins-")))
        work.mkdir(parents=True, exist_ok=True)
        task = SyntheticTask(vocab_size=64, seed=0)
        train_path, eval_path = write_data(work, args.n_train, args.n_eval, task)
        seeds = list(range(args.seeds))
        inits = {seed: initial_weights(work, seed, task) for seed in seeds}
        results: dict[str, list[dict]] = {name: [] for name in CONDITIONS}
        for name in ("none", "rating small", "rating large"):
            for seed in seeds:
                results[name].append(run(work, name, seed, inits[seed], train_path, eval_path, args, CONDITIONS[name]))
        oracle = oracle_row(eval_path)
        references = [str(work / f"none-seed{seed}") for seed in seeds]
        reference_path = work / "train-reference-margins.jsonl"
        estimate = estimate_margin_file(references, str(train_path), reference_path)
        print(f"reference margins: {json.dumps(estimate)}", file=sys.stderr)
        for seed in seeds:
            results["reference"].append(run(work, "reference", seed, inits[seed], reference_path, eval_path, args,
                                            CONDITIONS["reference"]))
        for name in ("confidence", "constant 0.5"):
            for seed in seeds:
                results[name].append(run(work, name, seed, inits[seed], train_path, eval_path, args, CONDITIONS[name]))
        oracle = oracle_row(eval_path)
    elapsed = time.perf_counter() - started

    command = "python benchmarks/margins_experiment.py" + "".join(
        f" {flag} {getattr(args, attr)}" for flag, attr in
        (("--seeds", "seeds"), ("--steps", "steps"), ("--n-train", "n_train"), ("--n-eval", "n_eval"))
    ) + (f" --out {args.out}" if args.out else "")
    report = "\n".join([
        HEADING,
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min on {platform.machine()}, CPU).",
        "",
        f"Synthetic ground truth (vocab 64, Bradley–Terry labels on the true reward, Llama 2 ratings = quartiles of "
        f"the true gap), {args.n_train} training pairs, {args.n_eval} held-out pairs; Qwen3-style model "
        f"(hidden 32, 2 layers), {args.steps} steps of 64 pairs, lr 3e-3; mean ± std over {args.seeds} seeds "
        "(each seed: one initial model shared by every condition). Accuracy columns are per rating bucket "
        "(Llama 2 Table 28); ECE is of σ(Δ) with 10 bins (`jaxrm.calibration`).",
        "",
        f"Reference margins (condition 4): the {args.seeds} `none` models as an ensemble; mean margin "
        f"{estimate['mean_margin']:.3f}, mean ensemble std {estimate['mean_margin_std']:.3f}, "
        f"{estimate['share_swapped']:.1%} of training pairs look swapped to the ensemble (margin 0).",
        "",
        table(results),
        oracle,
        "",
    ])
    print(report)
    if args.out:
        write_section(args.out, report)
    return 0


HEADING = "## Margins experiment (`benchmarks/margins_experiment.py`): where the m in −log σ(r_w − r_l − m) comes from"


def write_section(path: Path, report: str) -> None:
    """Puts ``report`` into ``path`` in place of its previous margins section (appended if none);
    the other sections and the hand-written reading after the table are the file's own."""
    text = path.read_text() if path.exists() else ""
    start = text.find(HEADING)
    if start < 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.rstrip() + ("\n\n" if text else "") + report)
        return
    table_end = text.find("\n\n", text.find("| true reward (oracle)", start))
    end = len(text) if table_end < 0 else table_end
    path.write_text(text[:start] + report.rstrip() + text[end:])


if __name__ == "__main__":
    sys.exit(main())
