"""A column mapping: a user's own field names for the row fields the tool reads.

``data_paths.columns`` in train.yaml and ``verifily dataset create --columns`` map ``{field: your_name}``, e.g.
``{instruction: question, output: answer}``. The rows are rewritten once into the store's JSONL (sorted keys, as
``dataset.convert`` writes them), so every stage, cache key and row hash downstream reads the canonical fields:
``dataset create`` keeps the rewritten rows in the version folder (its content hash is theirs), and ``data_paths``
keeps them under ``$VERIFILY_HOME/cache/columns/<key>/``, where the key hashes the source bytes and the mapping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from verifily_train import jsonsafe
from verifily_train.dataset.rows import iter_jsonl
from verifily_train.config.validate import check_columns
from verifily_train.errors import ConfigError, DataError
from verifily_train.fsio import verifily_home

COLUMNS_VERSION = "columns/1"
def parse_columns_flag(text: str) -> Dict[str, str]:
    """``instruction=question,output=answer`` (``--columns``) as a dict; bad text is a ``ConfigError``."""
    out: Dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        field, eq, source = part.partition("=")
        if not part or not eq or not field.strip() or not source.strip():
            raise ConfigError("verifily dataset create", "--columns",
                              f"must be FIELD=YOUR_COLUMN pairs separated by commas; got {part!r}")
        out[field.strip()] = source.strip()
    return out


def map_row(row: dict, columns: Dict[str, str], where: str) -> dict:
    """``row`` with each mapped column renamed to its field; a row holding both is an error (one would be lost)."""
    if not columns:
        return row
    out = dict(row)
    for field, source in columns.items():
        if source == field or source not in row:
            continue
        if field in row and row[field] is not None and field not in columns.values():
            raise DataError(where, field, f"given twice: the row has its own {field!r} and column {source!r} is "
                                          f"mapped to it")
        out.pop(source, None)
    for field, source in columns.items():
        if source in row:
            out[field] = row[source]
    return out


def map_jsonl(source: Path, dest: Path, columns: Dict[str, str], display: Optional[str] = None) -> int:
    """Rewrite a JSONL split with ``columns`` applied, one sorted-keys JSON object a line; returns the row count."""
    display = display or str(source)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for lineno, row in iter_jsonl(source, display):
                row = map_row(row, columns, f"{display}:{lineno}")
                bad = jsonsafe.lone_surrogate(row)
                if bad is not None:  # a JSON escape like \ud800: it cannot be written as UTF-8
                    raise DataError(f"{display}:{lineno}", bad or None, "holds a lone surrogate (like \\ud800): not "
                                                                        "valid Unicode text")
                out.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def _mapping_key(files: List[Tuple[str, Path]], columns: Dict[str, str]) -> str:
    h = hashlib.sha256(COLUMNS_VERSION.encode())
    h.update(json.dumps(sorted(columns.items())).encode())
    for split, path in files:
        h.update(split.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def mapped_data_paths(data_paths, task: str, home: Optional[Path] = None):
    """``data_paths`` with ``columns`` applied: the same section pointing at the rewritten splits (made once per
    source bytes and mapping, under ``$VERIFILY_HOME/cache/columns``); unchanged when there is no mapping."""
    columns = check_columns(getattr(data_paths, "columns", None), task, "config", "data_paths.columns")
    if not columns or not data_paths.train:
        return data_paths
    files = []
    for split in ("train", "val", "test"):
        value = getattr(data_paths, split)
        if value:
            if not Path(value).is_file():
                raise DataError(value, None, f"data_paths.{split}: file not found")
            files.append((split, Path(value)))
    folder = (home or verifily_home()) / "cache" / "columns" / _mapping_key(files, columns)[:32]
    folder.mkdir(parents=True, exist_ok=True)
    mapped = {}
    for split, path in files:
        dest = folder / f"{split}.jsonl"
        if not dest.is_file():  # written whole (os.replace), so a file that is there is complete
            map_jsonl(path, dest, columns, str(path))
        mapped[split] = str(dest)
    return dataclasses.replace(data_paths, **mapped)
