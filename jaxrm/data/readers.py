"""Reading preference records from files and Hugging Face datasets, with file:line errors.

Sources, by form:

* ``*.jsonl``, ``*.jsonl.gz``, ``*.json``, ``*.json.gz``: one JSON object a line (blank lines are
  skipped); a ``.json`` file that holds one JSON array is read as that array. Records are located
  as ``path:line`` (1-based).
* ``*.parquet``: one record a row, located as ``path[row]`` (0-based).
* a directory saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a directory of
  data files that ``datasets.load_dataset`` understands: rows located as ``name[index]``.
* a Hugging Face hub name (``owner/name``): read from the local ``datasets`` cache only. jaxrm never
  downloads during a run; download once where there is network and pass the saved directory (or call
  :func:`read_records` with ``allow_download=True``).

Nothing is dropped: a record that cannot be read stops the read with a :class:`DataError`, and
readable-but-suspicious records (identical chosen and rejected, an empty response after the prompt
split, unknown fields under ``unknown_fields="warn"``) are kept, counted and reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from jaxrm.data.records import DataError, PairRecord, Record, parse_record, record_responses

__all__ = ["ReadReport", "Record", "read_records", "iter_raw_records"]

#: Warning lines kept in a report; the rest are counted in ``n_warnings``.
MAX_WARNINGS = 20

_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)


@dataclasses.dataclass
class ReadReport:
    """What a read found. ``warnings`` keeps the first :data:`MAX_WARNINGS` lines (plus one line that
    counts the rest); ``n_warnings`` counts them all."""

    n_records: int
    n_identical_pairs: int
    warnings: list[str]
    n_warnings: int = 0
    #: Records with a response that is empty after splitting off the shared prompt (kept).
    n_empty_responses: int = 0
    #: Records per kind: ``{"pairwise": n, "ranked": n, "tie": n}`` (kinds that occur).
    kinds: dict[str, int] = dataclasses.field(default_factory=dict)


def read_records(
    source: str | os.PathLike,
    *,
    split: str = "train",
    unknown_fields: str = "error",
    limit: int | None = None,
    allow_download: bool = False,
) -> tuple[list[Record], ReadReport]:
    """Reads and validates every record of ``source``.

    Args:
      source: a JSONL / JSON / Parquet file, a ``datasets`` directory, or a hub dataset name.
      split: the split of a dataset with several (ignored for single files).
      unknown_fields: ``"error"``, ``"warn"`` or ``"ignore"`` a field jaxrm does not know.
      limit: read at most this many records (``None``: all).
      allow_download: let ``datasets`` fetch a hub dataset that is not cached (off by default: runs
        read local data only, so they are reproducible and never wait on the network).

    Returns:
      ``(records, report)``.

    Raises:
      DataError: the source does not exist, cannot be parsed, is empty, or holds a bad record.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for all records), got {limit}")
    if unknown_fields not in ("error", "warn", "ignore"):
        raise ValueError(f"unknown_fields must be 'error', 'warn' or 'ignore', got {unknown_fields!r}")
    log = _WarningLog()
    records: list[Record] = []
    n_identical = n_empty = 0
    kinds: dict[str, int] = {}
    for obj, location in iter_raw_records(source, split=split, allow_download=allow_download):
        if limit is not None and len(records) >= limit:
            break
        record_warnings: list[str] = []
        record = parse_record(obj, location, unknown_fields=unknown_fields, warnings=record_warnings)
        for line in record_warnings:
            log.add(line)
        kind = {"PairRecord": "pairwise", "RankedRecord": "ranked", "TieRecord": "tie"}[type(record).__name__]
        kinds[kind] = kinds.get(kind, 0) + 1
        if isinstance(record, PairRecord) and record.chosen == record.rejected:
            n_identical += 1
            log.add(
                f"{location}: chosen and rejected are identical (after splitting off the shared prompt), so the "
                "pair carries no preference signal; it is kept - remove it from the data if that is not intended"
            )
        if any(_is_empty(response) for response in record_responses(record)):
            n_empty += 1
            log.add(
                f"{location}: a response is empty after splitting off the shared prompt (the last assistant "
                "turn is blank); it is kept, since an empty answer is what the annotator rated"
            )
        records.append(record)
    if not records:
        raise DataError(f"{os.fspath(source)}: contains no records; check the path (and split={split!r})")
    report = ReadReport(
        n_records=len(records), n_identical_pairs=n_identical, warnings=log.lines(),
        n_warnings=log.count, n_empty_responses=n_empty, kinds=kinds,
    )
    return records, report


def iter_raw_records(
    source: str | os.PathLike, *, split: str = "train", allow_download: bool = False
) -> Iterator[tuple[object, str]]:
    """Yields ``(raw_record, location)`` for every record of ``source``, without validating it."""
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_dir():
        yield from _iter_dataset(name, split=split, local=True, allow_download=allow_download)
        return
    if path.exists():
        lower = path.name.lower()
        if lower.endswith(_JSON_SUFFIXES):
            yield from _iter_json(path, name)
        elif lower.endswith(_PARQUET_SUFFIXES):
            yield from _iter_parquet(path, name)
        else:
            raise DataError(
                f"{name}: unsupported file type; use .jsonl, .jsonl.gz, .json or .parquet, "
                "or a Hugging Face datasets directory"
            )
        return
    if _looks_like_path(name):
        raise DataError(f"{name}: no such file or directory; check the path (relative paths start at {os.getcwd()})")
    yield from _iter_dataset(name, split=split, local=False, allow_download=allow_download)


class _WarningLog:
    def __init__(self, cap: int = MAX_WARNINGS):
        self.cap = cap
        self.count = 0
        self._lines: list[str] = []

    def add(self, line: str) -> None:
        self.count += 1
        if len(self._lines) < self.cap:
            self._lines.append(line)

    def lines(self) -> list[str]:
        extra = self.count - len(self._lines)
        return self._lines + ([f"... and {extra} more warning(s) like these"] if extra else [])


def _is_empty(response) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return all(not message.content.strip() for message in response)


def _looks_like_path(name: str) -> bool:
    lower = name.lower()
    return (
        lower.endswith(_JSON_SUFFIXES + _PARQUET_SUFFIXES + (".gz", ".csv", ".arrow", ".txt"))
        or name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
    )


def _open_text(path: Path, name: str) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_json(path: Path, name: str) -> Iterator[tuple[object, str]]:
    try:
        with _open_text(path, name) as handle:
            first = _first_char(handle)
            handle.seek(0)
            if first == "[" and path.name.lower().endswith((".json", ".json.gz")):
                yield from _iter_json_array(handle, name)
                return
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{name}:{number}: not valid JSON ({error.msg} at column {error.colno}); "
                        "each line must hold exactly one JSON object"
                    ) from None
                yield obj, f"{name}:{number}"
    except UnicodeDecodeError as error:
        raise DataError(f"{name}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    except (gzip.BadGzipFile, EOFError, OSError) as error:
        raise DataError(f"{name}: cannot be read ({error}); check that the file is complete and not corrupt") from None


def _first_char(handle) -> str:
    while True:
        chunk = handle.read(1)
        if not chunk or not chunk.isspace():
            return chunk


def _iter_json_array(handle, name: str) -> Iterator[tuple[object, str]]:
    try:
        items = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(f"{name}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from None
    for index, obj in enumerate(items):
        yield obj, f"{name}[{index}]"


def _iter_parquet(path: Path, name: str) -> Iterator[tuple[object, str]]:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{name}: not a readable Parquet file ({error})") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield obj, f"{name}[{row}]"
            row += 1


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Keeps ``datasets`` (and the hub client under it) off the network while reading."""
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _iter_dataset(name: str, *, split: str, local: bool, allow_download: bool) -> Iterator[tuple[object, str]]:
    import datasets

    directory = Path(name).expanduser()
    try:
        with _hub_offline(not allow_download):
            if local and (directory / datasets.config.DATASETDICT_JSON_FILENAME).exists():
                dataset = datasets.load_from_disk(str(directory))
            elif local and (directory / datasets.config.DATASET_STATE_JSON_FILENAME).exists():
                dataset = datasets.load_from_disk(str(directory))
            else:
                dataset = datasets.load_dataset(str(directory) if local else name)
    except Exception as error:  # datasets raises many types; all mean "cannot load this here"
        if local:
            raise DataError(
                f"{name}: cannot be read as a Hugging Face dataset directory ({type(error).__name__}: {error}); "
                "pass a directory written by save_to_disk, or one holding .jsonl/.parquet data files"
            ) from None
        if allow_download:
            raise DataError(
                f"{name}: cannot load this Hugging Face dataset ({type(error).__name__}: {error})"
            ) from None
        raise DataError(
            f"{name}: not a local file or directory, and no Hugging Face dataset of that name is available "
            "offline (jaxrm does not download during a run); download it where there is network, e.g. "
            f"datasets.load_dataset({name!r}).save_to_disk('DIR'), and pass the local path DIR"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(
                f"{name}: has no split {split!r}; its splits are {', '.join(dataset)} (choose one with split=...)"
            )
        dataset = dataset[split]
    for index, row in enumerate(dataset):
        yield row, f"{name}[{index}]"
