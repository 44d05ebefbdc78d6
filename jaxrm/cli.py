"""The ``jaxrm`` command: argument parsing only; every command is a library call a Python user can make.

    jaxrm train CONFIG.yaml [key=value …]
    jaxrm eval MODEL_OR_RUN --data FILE [--json]
    jaxrm score MODEL_OR_RUN --data FILE --out FILE.jsonl
    jaxrm export RUN --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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

    score = commands.add_parser("score", help="write the reward of every response to a JSONL file")
    score.add_argument("model", help="a run directory or a Hugging Face model directory")
    score.add_argument("--data", required=True)
    score.add_argument("--out", required=True, help="output JSONL path")
    score.add_argument("--max-length", type=int)
    score.add_argument("--batch-size", type=int)
    score.add_argument("--checkpoint", choices=("best", "latest"), default="best")

    export = commands.add_parser("export", help="export a run as a Hugging Face *ForSequenceClassification model")
    export.add_argument("run", help="a run directory")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _commands().parse_args(argv)
    from jaxrm.data.records import DataError
    from jaxrm.train.config import ConfigError

    try:
        if args.command == "train":
            from jaxrm.train.config import load_config
            from jaxrm.train.loop import train

            train(load_config(args.config, args.overrides))
        elif args.command == "eval":
            from jaxrm.inference import evaluate_model

            metrics = evaluate_model(args.model, args.data, max_length=args.max_length,
                                     batch_size=args.batch_size, checkpoint=args.checkpoint)
            if args.json:
                print(json.dumps(metrics))
            else:
                from jaxrm.train.metrics_log import summary_table

                print(summary_table(metrics))
                for level, accuracy in metrics.get("accuracy_by_rating", {}).items():
                    print(f"accuracy ({level}): {accuracy:.4f}")
        elif args.command == "score":
            from jaxrm.inference import score_file

            count = score_file(args.model, args.data, args.out, max_length=args.max_length,
                               batch_size=args.batch_size, checkpoint=args.checkpoint)
            print(f"wrote {count} scored records to {args.out}", file=sys.stderr)
        elif args.command == "export":
            from jaxrm.inference import export_run

            export_run(args.run, Path(args.out), checkpoint=args.checkpoint)
            print(f"exported {args.run} to {args.out} (Hugging Face format)", file=sys.stderr)
    except (ConfigError, DataError, FileNotFoundError) as error:
        print(f"jaxrm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
