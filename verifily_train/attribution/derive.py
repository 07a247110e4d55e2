"""Derived dataset versions for attribution arms: without a tag value's train rows, or without random rows.

Each derived version is an ordinary, hash-addressed store version whose manifest records
``derived_from: {ref, content_hash, rule}``; val and test are copied unchanged. A second call reuses it
(and refuses a same-named version that was not derived by the same rule).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

from verifily_train.errors import DatasetExistsError, DataError, VerifilyError
from verifily_train.dataset.rows import tag_text
from verifily_train.dataset.store import create_version, resolve

MAX_VERSION_NAME = 128


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def safe_part(value: str) -> str:
    """``value`` as a part of a version name: kept when it is plain ASCII (letters, digits, ``._-``); otherwise
    its ASCII residue plus a digest of the whole value, so two values never share a name (``人工`` and
    ``合成`` were both ``x``; ``a b`` and ``a/b`` both ``a-b``)."""
    text = str(value)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    if safe == text and safe:
        return safe
    return f"{safe}-{_digest(text)}" if safe else _digest(text)


def bounded_name(name: str) -> str:
    """A version name cut to ``MAX_VERSION_NAME`` characters with a digest of the whole, so cutting never
    makes two names one."""
    if len(name) <= MAX_VERSION_NAME:
        return name
    return f"{name[:MAX_VERSION_NAME - 9]}-{_digest(name)}"


def derived_version_name(parent_version: str, key: str, value: str) -> str:
    return bounded_name(f"{parent_version}-without-{safe_part(key)}-{safe_part(tag_text(value))}")


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
    return None if value is None else tag_text(value)  # NFC: one value however its text was composed


def train_tag_counts(dv, key: str) -> Dict[str, int]:
    """How many train rows carry each value of tag ``key`` (values present in the rows, not the schema)."""
    counts = Counter(_tag(line, key) for line in train_lines(dv))
    counts.pop(None, None)
    return dict(sorted(counts.items()))


def derive_without(dv, key: str, value: str, home: Optional[Path] = None) -> dict:
    """The derived version of ``dv`` without the train rows tagged ``key: value`` (created once, then reused)."""
    lines = train_lines(dv)
    keep = [_tag(line, key) != tag_text(value) for line in lines]
    removed = keep.count(False)
    if removed == 0:
        raise VerifilyError(None, "--values", f"no train rows of {dv.ref} have {key}={value}")
    return store_derived(dv, derived_version_name(version_stem(dv), key, value),
                  {"drop_train_rows_where_tag": {key: value}}, lines, keep, home, {"value": value})


def derive_random(dv, rows: int, seed: int, home: Optional[Path] = None, draw: int = 0) -> dict:
    """The derived version of ``dv`` without ``rows`` train rows drawn at random with ``seed`` (a size-matched control).

    The draw depends only on the parent's content hash, ``rows``, ``seed`` and ``draw`` (the control's index
    within its seed), so it is the same on every call; ``draw`` 0 is the single control of earlier versions."""
    lines = train_lines(dv)
    if not 0 <= rows < len(lines):
        raise VerifilyError(None, "--values", f"cannot remove {rows} of the {len(lines)} train rows of {dv.ref}")
    key = f"{dv.content_hash}/{rows}/{seed}" + (f"/{draw}" if draw else "")
    drawn = set(random.Random(key).sample(range(len(lines)), rows))
    keep = [i not in drawn for i in range(len(lines))]
    name = bounded_name(f"{version_stem(dv)}-without-random-{rows}-seed{seed}" + (f"-draw{draw}" if draw else ""))
    rule = {"count": rows, "seed": seed, **({"draw": draw} if draw else {})}
    return store_derived(dv, name, {"drop_random_train_rows": rule}, lines, keep, home,
                         {"random_rows": rows, "seed": seed, "draw": draw})


def store_derived(dv, version: str, rule: dict, lines: List[str], keep: List[bool], home: Optional[Path],
           extra: dict, flag: str = "--values") -> dict:
    kept = [line for line, k in zip(lines, keep) if k]
    if not kept:  # named by the flag that chose the rows, without dumping them
        raise VerifilyError(None, flag, f"removes every one of the {len(lines)} train rows of {dv.ref}; a derived "
                                        "version needs at least one")
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
