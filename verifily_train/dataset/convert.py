"""Splits kept as Parquet, CSV or a ``datasets`` ``save_to_disk`` folder, converted to the store's JSONL.

The store keeps JSONL, so a version's content hash stays the spec's whatever the source. The conversion
is deterministic: rows in source order, each written as JSON with sorted keys (the bytes the fixtures'
``write_jsonl`` writes, non-ASCII kept as UTF-8), so the same input gives the same version hash.
Column mapping: every column becomes a field; ``tags`` (a struct, a map or a JSON object string) and
``tags.<key>`` columns become the row's tags; a null (NaN, an empty CSV cell) is an absent field; a
``messages`` column (a list of structs, or JSON text in CSV) is a conversation.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from verifily_train.dataset.rows import DEFAULT_ROW_SCHEMA, MESSAGES_FIELD, validate_row
from verifily_train.errors import DataError

JSONL, PARQUET, CSV, DISK = "jsonl", "parquet", "csv", "save_to_disk"
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
_TAG_PREFIXES = ("tags.", "tag.")


def source_format(path: Path) -> str:
    """How a split is kept: a ``save_to_disk`` folder, Parquet, CSV, or (anything else) JSONL."""
    if path.is_dir():
        return DISK
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return PARQUET
    if suffix in (".csv",):
        return CSV
    return JSONL


def is_dataset_dict(path: Path) -> bool:
    """A folder written by ``DatasetDict.save_to_disk`` (one sub-folder per split)."""
    return path.is_dir() and (path / "dataset_dict.json").is_file()


def dataset_dict_split(folder: Path, split: str) -> Optional[Path]:
    """The sub-folder of a ``DatasetDict`` folder holding ``split`` (val also as validation, valid or dev)."""
    try:
        names = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
    except (OSError, ValueError) as err:
        raise DataError(folder / "dataset_dict.json", None, f"cannot read: {err}") from None
    for name in SPLIT_NAMES[split]:
        if name in names and (folder / name).is_dir():
            return folder / name
    return None


def _required_columns(task: str, columns: List[str], where: str) -> None:
    have = set(columns)
    if task == "sft" and MESSAGES_FIELD in have:
        return
    missing = [c for c in DEFAULT_ROW_SCHEMA[task] if c not in have and c != "input"]
    if missing:
        also = " (or a messages column)" if task == "sft" else ""
        raise DataError(where, missing[0], f"missing column for task {task}{also}; columns: {', '.join(columns) or 'none'}")


def _plain(value, where: str, column: str):
    """Arrow/CSV values as JSON values: map entries as objects, nulls dropped from objects."""
    if isinstance(value, dict):
        return {str(k): _plain(v, where, f"{column}.{k}") for k, v in value.items() if v is not None}
    if isinstance(value, list):
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):  # an Arrow map
            return {str(k): _plain(v, where, f"{column}.{k}") for k, v in value if v is not None}
        return [_plain(v, where, column) for v in value]
    if isinstance(value, float) and value != value:  # NaN: how pandas writes a missing number
        return None
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise DataError(where, column, f"values of type {type(value).__name__} cannot be stored in JSONL "
                                   "(strings, numbers, booleans, lists and structs can)")


def _row(record: Dict[str, object], where: str) -> dict:
    row: dict = {}
    tags: dict = {}
    for column, value in record.items():
        if value is None:
            continue
        prefix = next((p for p in _TAG_PREFIXES if column.startswith(p)), None)
        if prefix:
            value = _plain(value, where, column)
            if value is not None:
                tags[column[len(prefix):]] = value
            continue
        if column in ("tags", MESSAGES_FIELD) and isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else None
            except ValueError as err:
                raise DataError(where, column, f"not valid JSON: {err}") from None
            if value is None:
                continue
        if column == "tags":
            value = _plain(value, where, column)
            if not isinstance(value, dict):
                raise DataError(where, "tags", f"must be an object of tag key -> value, got {type(value).__name__}")
            tags.update(value)
            continue
        value = _plain(value, where, column)
        if value is not None:
            row[column] = value
    if tags:
        row["tags"] = tags
    return row


def _parquet_records(path: Path) -> Tuple[List[str], Iterator[Tuple[str, dict]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses for unreadable files
        raise DataError(path, None, f"cannot read as Parquet: {err}") from None
    return table.column_names, ((f"{path}: row {i}", r) for i, r in enumerate(table.to_pylist(), start=1))


def _disk_records(path: Path) -> Tuple[List[str], Iterator[Tuple[str, dict]]]:
    from datasets import Dataset, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(path, None, f"not a folder written by datasets' save_to_disk: {err}") from None
    if not isinstance(ds, Dataset):
        raise DataError(path, None, f"is a DatasetDict with splits {', '.join(ds)}; give it as --train (its splits "
                                    "are then used) or name the split's sub-folder")
    return ds.column_names, ((f"{path}: row {i}", r) for i, r in enumerate(ds, start=1))


def _csv_records(path: Path) -> Tuple[List[str], Iterator[Tuple[str, dict]]]:
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, None, f"cannot read as CSV: {err}") from None
    if len(set(columns)) != len(columns):
        raise DataError(path, None, f"the header names a column twice ({', '.join(columns)})")

    def rows() -> Iterator[Tuple[str, dict]]:
        with handle:
            try:
                for record in reader:
                    where = f"{path}:{reader.line_num}"
                    if None in record:
                        raise DataError(where, None, f"has more cells than the header's {len(columns)} columns")
                    yield where, {k: (v if v != "" else None) for k, v in record.items()}  # empty cell: absent
            except (UnicodeDecodeError, csv.Error) as err:
                raise DataError(f"{path}:{reader.line_num}", None, f"cannot read as CSV: {err}") from None

    return columns, rows()


def convert_split(source: Path, task: str, dest: Path) -> dict:
    """Write ``source`` (Parquet, CSV or a save_to_disk folder) as validated JSONL at ``dest``; its provenance."""
    fmt = source_format(source)
    reader = {PARQUET: _parquet_records, CSV: _csv_records, DISK: _disk_records}[fmt]
    columns, records = reader(source)
    _required_columns(task, columns, str(source))
    count = 0
    with open(dest, "w", encoding="utf-8", newline="\n") as out:
        for where, record in records:
            row = _row(record, where)
            validate_row(row, task, {}, {}, where)
            out.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
            count += 1
    if count == 0:
        raise DataError(source, None, "has no rows")
    return {"format": fmt, "name": source.name, "rows": count}
