"""Derived dataset versions for attribution arms: without a tag value's train rows, or without random rows.

Each derived version is an ordinary, hash-addressed store version whose manifest records
``derived_from: {ref, content_hash, rule}``; val and test are copied unchanged. A second call reuses it
(and refuses a same-named version that was not derived by the same rule).
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

from verifily_train.errors import DatasetExistsError, DataError, VerifilyError
from verifily_train.dataset.store import create_version, resolve


def safe_part(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).strip("-.") or "x"


def derived_version_name(parent_version: str, key: str, value: str) -> str:
    return f"{parent_version}-without-{safe_part(key)}-{safe_part(value)}"[:128]


def version_stem(dv) -> str:
    """The parent's version name that derived names start with (``v`` for a ``data_paths`` dataset, whose
    "version" is its content hash, which a version name may not start with)."""
    version = str(dv.version or "v")
    return "v" if version.startswith("sha256:") else version


def train_lines(dv) -> List[str]:
    if not dv.split_files("train"):
        raise DataError(dv.manifest_path or dv.data_path, "files", "has no train split to remove rows from")
    lines = []
    for data_file in dv.split_files("train"):
        with open(data_file.abs_path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    lines.append(line if line.endswith("\n") else line + "\n")
    return lines


def _tag(line: str, key: str) -> Optional[str]:
    value = (json.loads(line).get("tags") or {}).get(key)
    return None if value is None else str(value)


def train_tag_counts(dv, key: str) -> Dict[str, int]:
    """How many train rows carry each value of tag ``key`` (values present in the rows, not the schema)."""
    counts = Counter(_tag(line, key) for line in train_lines(dv))
    counts.pop(None, None)
    return dict(sorted(counts.items()))


def derive_without(dv, key: str, value: str, home: Optional[Path] = None) -> dict:
    """The derived version of ``dv`` without the train rows tagged ``key: value`` (created once, then reused)."""
    lines = train_lines(dv)
    keep = [_tag(line, key) != str(value) for line in lines]
    removed = keep.count(False)
    if removed == 0:
        raise VerifilyError(None, "--values", f"no train rows of {dv.ref} have {key}={value}")
    return store_derived(dv, derived_version_name(version_stem(dv), key, value),
                  {"drop_train_rows_where_tag": {key: value}}, lines, keep, home, {"value": value})


def derive_random(dv, rows: int, seed: int, home: Optional[Path] = None) -> dict:
    """The derived version of ``dv`` without ``rows`` train rows drawn at random with ``seed`` (a size-matched control).

    The draw depends only on the parent's content hash, ``rows`` and ``seed``, so it is the same on every call."""
    lines = train_lines(dv)
    if not 0 <= rows < len(lines):
        raise VerifilyError(None, "--values", f"cannot remove {rows} of the {len(lines)} train rows of {dv.ref}")
    drawn = set(random.Random(f"{dv.content_hash}/{rows}/{seed}").sample(range(len(lines)), rows))
    keep = [i not in drawn for i in range(len(lines))]
    name = f"{version_stem(dv)}-without-random-{rows}-seed{seed}"[:128]
    return store_derived(dv, name, {"drop_random_train_rows": {"count": rows, "seed": seed}}, lines, keep, home,
                  {"random_rows": rows, "seed": seed})


def store_derived(dv, version: str, rule: dict, lines: List[str], keep: List[bool], home: Optional[Path],
           extra: dict) -> dict:
    kept = [line for line, k in zip(lines, keep) if k]
    if not kept:
        raise VerifilyError(None, "--values", f"{json.dumps(rule)} leaves {dv.ref} without train rows")
    dataset_id = dv.dataset_id if dv.dataset_id != "local" else f"local-{dv.content_hash.split(':')[-1][:12]}"
    derived_from = {"ref": dv.ref, "content_hash": dv.content_hash, "rule": rule}
    with tempfile.TemporaryDirectory(prefix="verifily-derive-") as tmp:
        splits = {"train": Path(tmp) / "train.jsonl"}
        splits["train"].write_text("".join(kept), encoding="utf-8")
        for split in ("val", "test"):  # unchanged rows, in manifest order
            if dv.split_files(split):
                splits[split] = Path(tmp) / f"{split}.jsonl"
                with open(splits[split], "wb") as out:
                    for data_file in dv.split_files(split):
                        data = Path(data_file.abs_path).read_bytes()
                        out.write(data if data.endswith(b"\n") or not data else data + b"\n")
        try:
            child = create_version(dataset_id, version, dv.task, str(splits["train"]),
                                   *(str(splits[k]) if k in splits else None for k in ("val", "test")),
                                   home=home, derived_from=derived_from)
        except DatasetExistsError:
            child = resolve(f"{dataset_id}@{version}", home, validate_rows=False)
            with open(child.manifest_path, encoding="utf-8") as handle:
                recorded = json.load(handle).get("derived_from")
            if recorded != derived_from:
                raise DatasetExistsError(child.manifest_path, None, f"{child.ref} exists but was not derived from "
                                                                    f"{dv.ref} by this rule") from None
    return dict(extra, ref=child.ref, content_hash=child.content_hash, removed_rows=len(lines) - len(kept),
                kept_rows=len(kept), rule=rule, parent=dv.ref)
