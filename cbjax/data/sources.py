"""Loading (prompt, completion) rows from local files or Hugging Face Hub datasets.

Errors name the file, the line (or record) and the field, so that a broken row in a data set of
thousands can be found and fixed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cbjax.data.config import SourceConfig

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

Record = tuple[str, dict[str, Any]]


class DataSourceError(ValueError):
    """A data source that cannot be read, or a row in it that is invalid."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One conversation: a user request and the assistant's completion."""

    prompt: str
    completion: str
    # Location of the row for error messages, e.g. "data/harmful.jsonl line 7".
    origin: str


def load_source(source: SourceConfig) -> list[Example]:
    """Read, filter and limit the rows of one source.

    Raises DataSourceError on an unreadable file, a missing column, a non-string or empty text,
    or a source with no row left after the filter.
    """
    examples = []
    for origin, record in _read_records(source):
        if not _passes_filter(source, origin, record):
            continue
        examples.append(
            Example(
                prompt=_text_field(record, source.prompt_column, origin, "prompt_column"),
                completion=_text_field(record, source.completion_column, origin, "completion_column"),
                origin=origin,
            )
        )
        if source.limit is not None and len(examples) == source.limit:
            break
    if not examples:
        raise DataSourceError(f"{source.path}: no rows left after the filter {source.filter}")
    return examples


def _read_records(source: SourceConfig) -> Iterator[Record]:
    path = Path(source.path)
    if path.exists():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise DataSourceError(f"{path}: unsupported file type {path.suffix!r}; expected one of {LOCAL_SUFFIXES}")
        return reader(path)
    if path.suffix.lower() in LOCAL_SUFFIXES:
        raise DataSourceError(f"{path}: data file not found")
    return _read_hub(source)


def _read_jsonl(path: Path) -> Iterator[Record]:
    # Split on "\n" only: str.splitlines would also split at U+2028, which JSON strings may contain.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        origin = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataSourceError(
                f"{origin}: invalid JSON ({err.msg} at column {err.colno}); "
                "a .jsonl file needs one JSON object per line"
            ) from None
        yield origin, _require_object(record, origin)


def _read_json(path: Path) -> Iterator[Record]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{path} line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(records, list):
        raise DataSourceError(f"{path}: expected a JSON list of objects, got a {type(records).__name__}")
    for number, record in enumerate(records, start=1):
        origin = f"{path} record {number}"
        yield origin, _require_object(record, origin)


def _read_csv(path: Path) -> Iterator[Record]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    start_line = 2
    try:
        for record in reader:
            yield f"{path} line {start_line}", record
            # A quoted field may span lines, so the next record starts after the last line read.
            start_line = reader.line_num + 1
    except csv.Error as err:
        raise DataSourceError(f"{path} line {reader.line_num}: invalid CSV ({err})") from None


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowInvalid, OSError) as err:
        raise DataSourceError(f"{path}: not a valid Parquet file ({err})") from None
    for number, record in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {number}", record


def _read_hub(source: SourceConfig) -> Iterator[Record]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, source.subset, split=source.split)
    except (OSError, ValueError) as err:
        raise DataSourceError(
            f"could not load Hub dataset {source.path!r} (subset {source.subset!r}, split {source.split!r}): "
            f"{err}. Without network access, give the path of a local .jsonl, .json, .csv or .parquet file"
        ) from err
    for number, record in enumerate(dataset, start=1):
        yield f"{source.path} ({source.split}) row {number}", record


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig drops a byte-order mark, which would otherwise become part of the first CSV header
        # or break json.loads.
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataSourceError(f"{path}: not UTF-8 text (invalid byte at offset {err.start})") from None


def _require_object(record: Any, origin: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataSourceError(f"{origin}: expected a JSON object, got {type(record).__name__}")
    return record


def _passes_filter(source: SourceConfig, origin: str, record: dict[str, Any]) -> bool:
    for column, condition in source.filter.items():
        if column not in record:
            raise DataSourceError(f"{origin}: missing field {column!r} used by the filter; fields are {sorted(record)}")
        if not condition.accepts(record[column]):
            return False
    return True


def _text_field(record: dict[str, Any], column: str, origin: str, option: str) -> str:
    if column not in record:
        raise DataSourceError(
            f"{origin}: missing field {column!r}; fields are {sorted(record)} (set {option} to choose another)"
        )
    value = record[column]
    if not isinstance(value, str):
        raise DataSourceError(f"{origin}: field {column!r} must be text, got {type(value).__name__}")
    if not value.strip():
        raise DataSourceError(f"{origin}: field {column!r} is empty")
    return value
