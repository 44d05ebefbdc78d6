"""The ``jaxrm`` command: argument parsing only; every command is a library call a Python user can make.

    jaxrm train CONFIG.yaml [key=value …]
    jaxrm eval MODEL_OR_RUN[,…] --data FILE [--json] [--ensemble mean|min|uncertainty] [--plots DIR]
    jaxrm score MODEL_OR_RUN[,…] --data FILE --out FILE.jsonl
    jaxrm margins estimate --model RUN_OR_MODEL[,…] --data IN --out OUT.jsonl [--max-margin M] [--scale S]
    jaxrm export RUN --out DIR
    jaxrm bench losses|train|peers [options]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _commands() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrm", description="Train and use reward models for RLHF in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (or resume) a reward model from a YAML config")
    train.add_argument("config", help="YAML config file (an existing run's config.yaml resumes that run)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")

    evaluate = commands.add_parser("eval", help="evaluate a run or model on preference data")
    evaluate.add_argument("model", help="a run directory or a Hugging Face model directory")
    evaluate.add_argument("--data", required=True, help="JSONL / JSONL.gz / Parquet / dataset, or 'synthetic'")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--max-length", type=int, help="tokens per sequence (default: the run's data.max_length)")
    evaluate.add_argument("--batch-size", type=int, help="examples per batch (default: the run's train.batch_size)")
    evaluate.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    evaluate.add_argument("--ensemble", choices=("mean", "min", "uncertainty"), default="mean",
                          help="how several comma-separated models combine: mean, worst case (min), or "
                               "mean - λ·variance (uncertainty)")
    evaluate.add_argument("--uncertainty-penalty", type=float, default=1.0, metavar="λ",
                          help="λ of --ensemble uncertainty (default 1)")
    evaluate.add_argument("--plots", "--out-dir", dest="plots", metavar="DIR",
                          help="write reliability.png and rewards.png into DIR (default: write nothing)")

    score = commands.add_parser("score", help="write the reward of every response to a JSONL file")
    score.add_argument("model", help="a run directory or a Hugging Face model directory")
    score.add_argument("--data", required=True)
    score.add_argument("--out", required=True, help="output JSONL path")
    score.add_argument("--max-length", type=int)
    score.add_argument("--batch-size", type=int)
    score.add_argument("--checkpoint", choices=("best", "latest"), default="best")

    margins = commands.add_parser("margins", help="margins without labels")
    margin_commands = margins.add_subparsers(dest="margins_command", required=True)
    estimate = margin_commands.add_parser(
        "estimate", help="write a reference margin (mean reward gap of a model or ensemble) into pairwise data")
    estimate.add_argument("--model", required=True, help="run or model directories, comma-separated for an ensemble")
    estimate.add_argument("--data", required=True, help="pairwise JSONL / Parquet / dataset to score")
    estimate.add_argument("--out", required=True, help="output JSONL: the records plus margin and margin_std")
    estimate.add_argument("--max-margin", type=_non_negative, default=3.0,
                          help="clip margins to [0, MAX] (default 3, Llama 2's largest); 'inf' for no cap")
    estimate.add_argument("--scale", type=_non_negative, default=1.0, help="margin = clip(scale · mean gap, 0, max)")
    estimate.add_argument("--max-length", type=int)
    estimate.add_argument("--batch-size", type=int)
    estimate.add_argument("--checkpoint", choices=("best", "latest"), default="best")

    export = commands.add_parser("export", help="export a run as a Hugging Face *ForSequenceClassification model")
    export.add_argument("run", help="a run directory")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--checkpoint", choices=("best", "latest"), default="best")

    from jaxrm.bench import add_commands

    add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _commands().parse_args(argv)
    from jaxrm.data.records import DataError
    from jaxrm.train.config import ConfigError
    from jaxrm.train.loop import NonFiniteLossError

    try:
        if args.command == "train":
            from jaxrm.train.config import load_config
            from jaxrm.train.loop import train

            train(load_config(args.config, args.overrides))
        elif args.command == "eval":
            from jaxrm.inference import evaluate_model

            metrics = evaluate_model(args.model, args.data, max_length=args.max_length,
                                     batch_size=args.batch_size, checkpoint=args.checkpoint, ensemble=args.ensemble,
                                     uncertainty_penalty=args.uncertainty_penalty, plots_dir=args.plots)
            if args.json:
                print(json.dumps(metrics))
            else:
                from jaxrm.train.metrics_log import summary_table

                print(summary_table(metrics))
            if args.plots:
                print(f"wrote reliability.png and rewards.png to {args.plots}", file=sys.stderr)
        elif args.command == "margins":
            from jaxrm.inference import estimate_margin_file

            summary = estimate_margin_file(args.model, args.data, args.out, scale=args.scale,
                                           max_margin=None if args.max_margin == float("inf") else args.max_margin,
                                           max_length=args.max_length, batch_size=args.batch_size,
                                           checkpoint=args.checkpoint)
            print(f"wrote {summary['pairs']} pairs with margins from {summary['members']} model(s) to {args.out}: "
                  f"mean margin {summary['mean_margin']:.3f}, mean ensemble std {summary['mean_margin_std']:.3f}, "
                  f"{summary['share_swapped']:.1%} of pairs look swapped to the reference (margin 0)", file=sys.stderr)
        elif args.command == "score":
            from jaxrm.inference import score_file

            count = score_file(args.model, args.data, args.out, max_length=args.max_length,
                               batch_size=args.batch_size, checkpoint=args.checkpoint)
            print(f"wrote {count} scored records to {args.out}", file=sys.stderr)
        elif args.command == "bench":
            from jaxrm.bench import run

            run(args.benchmark, args.options)
        elif args.command == "export":
            from jaxrm.inference import export_run

            export_run(args.run, Path(args.out), checkpoint=args.checkpoint)
            print(f"exported {args.run} to {args.out} (Hugging Face format)", file=sys.stderr)
    except (ConfigError, DataError, FileNotFoundError) as error:
        print(f"jaxrm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        # Not a usage error: the run diverged. Its own exit code, so a job scheduler does not retry it.
        print(f"jaxrm {args.command}: error: {error}", file=sys.stderr)
        return 3
    return 0


def console_main() -> int:
    """The ``jaxrm`` console command: restarts once with malloc tuned for XLA:CPU (`jaxrm.host`), then `main`."""
    from jaxrm.host import reexec

    reexec("jaxrm.cli", sys.argv[1:])
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
