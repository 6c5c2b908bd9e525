"""Local task data files (``.jsonl``, ``.json``, ``.csv``, ``.parquet``) read into in-memory ``datasets.Dataset``s.

Read here rather than through ``datasets.load_dataset``: nothing is written to the datasets cache (a run writes
only into its output folder), and every problem with a file is one line naming the file and, where it can, the
line (:class:`DataFileError`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from datasets import Dataset


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataFileError(ValueError):
    """A local data file cannot be read as a table of rows; one-line message naming the file."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _text(path: Path, what: str = "") -> str:
    """The file's text; ``what`` (e.g. ``"Task file"``) names the kind of file in the one-line error."""
    named = f"{what} {path}" if what else str(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataFileError(f"Cannot read {named[0].lower()}{named[1:]}: {err.strerror or _first_line(err)}.") from None
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark, as some editors write it, is not part of the data
    except UnicodeDecodeError as err:
        raise DataFileError(f"{named} is not UTF-8 text (invalid byte at offset {err.start}).") from None


def read_json_file(path: Path, what: str = "") -> Any:
    """The JSON value in ``path`` (a data file, a task file, a method config); :class:`DataFileError` with one line
    naming the file (and ``what`` it is) when it cannot be read, is not UTF-8 or is not valid JSON."""
    text = _text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        named = f"{what} {path}" if what else str(path)
        raise DataFileError(f"{named} is not valid JSON: {err.msg} (line {err.lineno}).") from None


def _rows_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path} line {number} is not valid JSON: {err.msg}.") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path} line {number} is not a JSON object ({type(row).__name__}).")
        rows.append(row)
    return rows


def _rows_json(path: Path) -> list[dict[str, Any]]:
    data = read_json_file(path)
    if isinstance(data, list):
        bad = next((i for i, row in enumerate(data) if not isinstance(row, dict)), None)
        if bad is not None:
            raise DataFileError(f"{path}: item {bad} of the list is not a JSON object.")
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataFileError(f"{path}: its columns have different lengths {sorted(lengths)}.")
        return [dict(zip(data, values)) for values in zip(*data.values())]
    raise DataFileError(f"{path} must hold a list of row objects or an object of equal-length column lists.")


def _rows_csv(path: Path) -> list[dict[str, Any]]:
    text = _text(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
    except csv.Error as err:
        raise DataFileError(f"{path} is not valid CSV: {_first_line(err)}.") from None
    if reader.fieldnames is None:
        return []
    if any(None in row for row in rows):
        line = next(i for i, row in enumerate(rows, start=2) if None in row)
        raise DataFileError(f"{path} line {line} has more fields than the header.")
    return rows


def _table_parquet(path: Path) -> Dataset:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(str(path))
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise DataFileError(f"Cannot read {path} as parquet: {_first_line(err)}.") from None
    return Dataset(table)


def missing_value(value: Any) -> bool:
    """None, or a float NaN (how pandas and Arrow write a gap in a numeric column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def value_string(value: Any) -> str:
    """A cell as text; a float with an integral value as the integer it stands for (``1.0`` -> ``"1"``), since a
    numeric column with a gap turns its integers into floats."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Column lists over the union of the rows' keys (a key missing in a row is None there). A column whose
    values Arrow cannot hold together (``1`` and ``"a"``, a list and a number) is kept as strings."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {name: [row.get(name) for row in rows] for name in names}
    for name, values in columns.items():
        kinds = {type(v) for v in values if not missing_value(v)}
        if kinds and not (kinds <= {int, float} or len(kinds) == 1) or kinds & {list, dict}:
            columns[name] = [None if missing_value(v) else value_string(v) for v in values]
    return columns


def read_data_file(path: Path) -> Dataset:
    """The rows of a local data file as an in-memory ``Dataset``; :class:`DataFileError` when it cannot be read
    or holds no rows."""
    if path.is_dir():
        raise DataFileError(f"{path} is a folder, not a data file ({', '.join(SUFFIXES)}).")
    if not path.is_file():
        raise DataFileError(f"Data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataFileError(f"Unsupported data file {path}: use {', '.join(SUFFIXES)}.")
    if suffix == ".parquet":
        ds = _table_parquet(path)
    else:
        rows = {".jsonl": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv}[suffix](path)
        if not rows:
            raise DataFileError(f"{path} holds no rows.")
        try:
            ds = Dataset.from_dict(_columns(rows))
        except Exception as err:  # Arrow's type errors for values it cannot store
            raise DataFileError(f"Cannot read {path}: {_first_line(err)}.") from None
    if len(ds) == 0:
        raise DataFileError(f"{path} holds no rows.")
    return ds


__all__ = ["SUFFIXES", "DataFileError", "missing_value", "read_data_file", "read_json_file", "value_string"]
