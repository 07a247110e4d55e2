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
import math
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from verifily_train import jsonsafe
from verifily_train.dataset.columns import map_row
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
    record = jsonsafe.load_file(folder / "dataset_dict.json", DataError, expect=dict)
    names = record.get("splits", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(folder / "dataset_dict.json", "splits", "must be a list of split names")
    for name in SPLIT_NAMES[split]:
        if name in names and (folder / name).is_dir():
            return folder / name
    return None


def _required_columns(task: str, columns: List[str], where: str) -> None:
    have = set(columns)
    if task == "sft" and (MESSAGES_FIELD in have or {"prompt", "completion"} <= have or "text" in have):
        return  # a conversation, prompt/completion or plain text column set (rows.SFT_FORMAT_FIELDS)
    missing = [c for c in DEFAULT_ROW_SCHEMA[task] if c not in have and c != "input"]
    if missing:
        also = " (or a messages, prompt/completion or text column)" if task == "sft" else ""
        raise DataError(where, missing[0], f"missing column for task {task}{also}; columns: {', '.join(columns) or 'none'}")


def _plain(value, where: str, column: str):
    """Arrow/CSV values as JSON values: map entries as objects, nulls (NaN included) dropped from objects; an
    infinite number is refused (JSON has no such number: it would be stored as the non-JSON token Infinity)."""
    if isinstance(value, list) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        value = dict(value)  # an Arrow map
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = _plain(v, where, f"{column}.{k}")
            if v is not None:  # a null or NaN entry is an absent one, as a null cell is an absent field
                out[str(k)] = v
        return out
    if isinstance(value, list):
        return [_plain(v, where, column) for v in value]
    if isinstance(value, float) and value != value:  # NaN: how pandas writes a missing number
        return None
    if isinstance(value, float) and math.isinf(value):
        raise DataError(where, column, "is infinite: not a JSON number (leave the cell empty when it has no value)")
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
                key = column[len(prefix):]
                if key in tags:  # tags.<key> and tag.<key>, or the tags column came first
                    raise DataError(where, f"tags.{key}", f"given twice (column {column!r} and another)")
                tags[key] = value
            continue
        if column in ("tags", MESSAGES_FIELD) and isinstance(value, str):
            try:  # the guarded reader: 100,000-deep nesting, lone surrogates, NaN are one line, not a crash
                value = jsonsafe.loads(value, allow_nan=False) if value.strip() else None
            except jsonsafe.BadJson as err:
                raise DataError(where, f"{column}.{err.key}" if err.key else column, f"not valid JSON: {err.problem}") from None
            if value is None:
                continue
        if column == "tags":
            value = _plain(value, where, column)
            if not isinstance(value, dict):
                raise DataError(where, "tags", f"must be an object of tag key -> value, got {type(value).__name__}")
            both = sorted(set(value) & set(tags))
            if both:  # a tags.<key> column came first: one of the two would silently win
                raise DataError(where, f"tags.{both[0]}", "given twice, in the tags column and in its own column")
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

    import pyarrow as pa

    try:
        source = pq.ParquetFile(path)
        columns = source.schema_arrow.names
    except (OSError, ValueError, pa.ArrowException) as err:  # ArrowInvalid and OSError subclasses
        raise DataError(path, None, f"cannot read as Parquet: {err}") from None

    def rows() -> Iterator[Tuple[str, dict]]:
        # a batch at a time: 1M dictionary-encoded rows (a 9 KB file) cost one batch of memory, not a million dicts
        done = 0
        try:
            for batch in source.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                try:
                    records = batch.to_pylist()
                except UnicodeDecodeError as err:  # a string column holding bytes that are not UTF-8
                    row = done + _first_bad_utf8_row(batch)
                    raise DataError(f"{path}: row {row}", _first_bad_utf8_column(batch),
                                    f"not valid UTF-8 ({err.reason})") from None
                for i, record in enumerate(records, start=done + 1):
                    yield f"{path}: row {i}", record
                done += len(records)
        except (OSError, ValueError, pa.ArrowException) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{path}: row {done + 1}", None, f"cannot read as Parquet: {err}") from None

    return columns, rows()


PARQUET_BATCH_ROWS = 4096


def _first_bad_utf8_column(batch) -> Optional[str]:
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            column.to_pylist()
        except UnicodeDecodeError:
            return name
    return None


def _first_bad_utf8_row(batch) -> int:
    for i in range(batch.num_rows):
        try:
            batch.slice(i, 1).to_pylist()
        except UnicodeDecodeError:
            return i + 1
    return 1


def _disk_records(path: Path) -> Tuple[List[str], Iterator[Tuple[str, dict]]]:
    import pyarrow as pa
    from datasets import Dataset, load_from_disk

    _check_disk_metadata(path)  # datasets reads these unguarded: a list or 100,000-deep JSON is a crash there
    try:
        ds = load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException) as err:
        # FileNotFoundError, an .arrow file cut short (OSError), metadata of the wrong shape (the rest)
        raise DataError(path, None, f"not a folder written by datasets' save_to_disk: {type(err).__name__}: "
                                    f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None
    if not isinstance(ds, Dataset):
        raise DataError(path, None, f"is a DatasetDict with splits {', '.join(ds)}; give it as --train (its splits "
                                    "are then used) or name the split's sub-folder")
    return ds.column_names, ((f"{path}: row {i}", r) for i, r in enumerate(ds, start=1))


def _check_disk_metadata(path: Path) -> None:
    """The JSON files of a ``save_to_disk`` folder through the guarded reader, each an object of the right shape."""
    if (path / "dataset_dict.json").is_file():
        jsonsafe.load_file(path / "dataset_dict.json", DataError, expect=dict)
    for name in ("state.json", "dataset_info.json"):
        if (path / name).is_file():
            jsonsafe.load_file(path / name, DataError, expect=dict)
    state = path / "state.json"
    if state.is_file():
        files = jsonsafe.load_file(state, DataError, expect=dict).get("_data_files")
        if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str)
                                                  for f in files):
            raise DataError(state, "_data_files", "must be a list of {\"filename\": ...} entries")


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


def convert_split(source: Path, task: str, dest: Path, mapping: Optional[Dict[str, str]] = None) -> dict:
    """Write ``source`` (Parquet, CSV or a save_to_disk folder) as validated JSONL at ``dest``; its provenance.
    ``mapping`` (``{field: your_column}``, ``dataset.columns``) renames columns before anything reads them."""
    fmt = source_format(source)
    reader = {PARQUET: _parquet_records, CSV: _csv_records, DISK: _disk_records}[fmt]
    columns, records = reader(source)
    renamed = {s: f for f, s in (mapping or {}).items()}
    _required_columns(task, [renamed.get(c, c) for c in columns], str(source))
    count = 0
    with open(dest, "w", encoding="utf-8", newline="\n") as out:
        for where, record in records:
            row = _row(map_row(record, mapping or {}, where), where)
            validate_row(row, task, {}, {}, where)
            bad = jsonsafe.lone_surrogate(row)
            if bad is not None:  # from a JSON escape in a cell: it cannot be written as UTF-8
                raise DataError(where, bad or None, "holds a lone surrogate (like \\ud800): not valid Unicode text")
            out.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
            count += 1
    if count == 0:
        raise DataError(source, None, "has no rows")
    return {"format": fmt, "name": source.name, "rows": count}
