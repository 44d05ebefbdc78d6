"""From a ``data.*`` config to tokenised examples: files, datasets or the synthetic source.

This is the one place that turns a source name into :class:`~jaxrm.data.tokenize.TokenizedExample`
lists, so training, evaluation and scoring read and tokenise the same way (same EOS, same truncation).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrm.data.readers import read_records
from jaxrm.data.records import parse_record
from jaxrm.data.synthetic import SyntheticTask
from jaxrm.data.tokenize import TokenizedExample, tokenize_records

SYNTHETIC = "synthetic"


@dataclasses.dataclass
class DataReport:
    """What reading and tokenising a source did: nothing is dropped, so everything is counted."""

    source: str
    n_records: int = 0
    n_truncated: int = 0
    n_identical_pairs: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "records": self.n_records,
            "truncated": self.n_truncated,
            "identical_pairs": self.n_identical_pairs,
            "skipped": 0,
        }


def synthetic_task(data_config) -> SyntheticTask:
    synthetic = data_config.synthetic
    return SyntheticTask(
        vocab_size=synthetic.vocab_size, min_words=synthetic.min_words,
        max_words=synthetic.max_words, seed=synthetic.seed,
    )


def synthetic_records(data_config, split: str) -> list[dict]:
    """The synthetic split as JSON-ready records (train and eval use different sampling seeds)."""
    synthetic = data_config.synthetic
    task = synthetic_task(data_config)
    count = synthetic.n_train if split == "train" else synthetic.n_eval
    seed = synthetic.seed * 1000 + (1 if split == "train" else 2)
    if synthetic.kind == "rankings":
        return task.rankings(count, synthetic.list_size, seed=seed)
    if synthetic.kind == "ties":
        return task.ties(count, seed=seed)
    return task.pairs(count, seed=seed, ratings=synthetic.ratings)


def load_examples(source: str, data_config, tokenizer, *, split: str = "train",
                  limit: int | None = None) -> tuple[list[TokenizedExample], DataReport]:
    """Reads ``source`` (a path, a dataset, or ``synthetic``) and tokenises it with ``tokenizer``."""
    report = DataReport(source=source)
    if source == SYNTHETIC:
        records = [parse_record(obj, f"synthetic:{split}[{i}]") for i, obj in enumerate(synthetic_records(data_config, split))]
    else:
        records, read_report = read_records(source, unknown_fields=data_config.unknown_fields, limit=limit)
        report.n_identical_pairs = read_report.n_identical_pairs
        report.warnings.extend(read_report.warnings)
    report.n_records = len(records)
    examples, tokenize_report = tokenize_records(
        records, tokenizer, max_length=data_config.max_length, truncation=data_config.truncation,
    )
    report.n_truncated = tokenize_report.n_truncated
    report.warnings.extend(tokenize_report.warnings)
    return examples, report


def split_holdout(examples: list, report: DataReport, fraction: float, seed: int):
    """A seeded random split into (train, held-out) examples, each with its own report."""
    order = np.random.default_rng(seed).permutation(len(examples))
    held = max(1, int(round(fraction * len(examples))))
    held_out = [examples[i] for i in sorted(order[:held].tolist())]
    train = [examples[i] for i in sorted(order[held:].tolist())]
    return (train, held_out, _report_of(train, report.source, report.warnings),
            _report_of(held_out, f"{report.source} (held-out {fraction:.0%})", []))


def _report_of(examples: list, source: str, warnings: list[str]) -> DataReport:
    identical = sum(all(np.array_equal(seq, example.sequences[0]) for seq in example.sequences[1:])
                    for example in examples)
    return DataReport(source=source, n_records=len(examples), n_truncated=sum(e.truncated for e in examples),
                      n_identical_pairs=identical, warnings=list(warnings))
