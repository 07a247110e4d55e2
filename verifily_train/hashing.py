"""Content hashes: every identity in Verifily is a SHA-256 of bytes, never of a path or mtime."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Union

PathLike = Union[str, os.PathLike]
_CHUNK = 1 << 20


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_content_hash(files: Iterable[PathLike], names: Iterable[str]) -> str:
    """``sha256:`` + SHA-256 over the data files' bytes, concatenated in sorted order of their names.

    ``names`` are the manifest's ``files[].path`` values (relative, ``/``-separated); sorting is by
    those strings, so the hash does not depend on where the version folder lives.
    """
    pairs = sorted(zip(names, files), key=lambda pair: pair[0])
    digest = hashlib.sha256()
    for _, path in pairs:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def canonical_json(value: object) -> str:
    """JSON with sorted keys and no whitespace: the same meaning always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_hash(*parts: object) -> str:
    """Hex SHA-256 of the canonical JSON of ``parts`` (strings, numbers, dicts, lists)."""
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()


def hash_tree(root: PathLike) -> str:
    """Hex SHA-256 over every file under ``root``: relative path and bytes, in sorted path order."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        digest.update(rel.encode("utf-8") + b"\0" + sha256_file(path).encode("ascii") + b"\n")
    return digest.hexdigest()
