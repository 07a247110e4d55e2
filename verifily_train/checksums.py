"""Checksum files (``checksums.sha256``): one ``sha256  relative/name`` line per file, for Runs and cache entries."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional

from verifily_train.errors import RunError
from verifily_train.fsio import atomic_write_text
from verifily_train.hashing import sha256_file

CHECKSUMS = "checksums.sha256"


def write_checksums(root: Path) -> int:
    """``sha256  relative/path`` for every file under ``root`` except the checksum file itself."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != CHECKSUMS:
            lines.append(f"{sha256_file(path)}  {rel}")
    atomic_write_text(root / CHECKSUMS, "\n".join(lines) + "\n")
    return len(lines)


_CHECKSUM_LINE = re.compile(r"([0-9a-f]{64})  (.+)")


def parse_checksums(listing: Path) -> Dict[str, str]:
    """``relative name -> sha256`` of a checksum file (a Run's or a cache entry's), exactly as :func:`write_checksums` writes it:
    LF line ends, one line per file, each name a plain relative path inside its folder (no ``..``, no ``.``
    or empty part, no leading ``/``, no backslash or control character), none twice."""
    data = listing.read_bytes()
    if b"\r" in data or (data and not data.endswith(b"\n")):
        raise RunError(listing, None, "not as written (line ends changed, or the file was cut short)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RunError(listing, None, "not valid UTF-8") from None
    expected: Dict[str, str] = {}
    for lineno, line in enumerate(text.split("\n")[:-1], start=1):
        match = _CHECKSUM_LINE.fullmatch(line)
        if not match:
            raise RunError(listing, f"line {lineno}", "malformed checksum line (expected '<sha256>  <name>')")
        digest, rel = match.groups()
        if not _plain_name(rel):
            raise RunError(listing, f"line {lineno}", f"{rel[:80]!r} is not a plain relative name inside the run")
        if rel in expected or rel == CHECKSUMS:
            raise RunError(listing, f"line {lineno}", f"{rel!r} is listed twice")
        expected[rel] = digest
    return expected


def _plain_name(rel: str) -> bool:
    parts = rel.split("/")
    return (not rel.startswith("/") and all(part not in ("", ".", "..") for part in parts)
            and not any(ch == "\\" or ord(ch) < 32 or ord(ch) == 127 for ch in rel))


def first_mismatch(root: Path, expected: Dict[str, str]) -> Optional[str]:
    """The first listed file that is missing or whose bytes changed (None when every one matches)."""
    for rel in sorted(expected):
        path = root / rel
        if not path.is_file():
            return rel
        if sha256_file(path) != expected[rel]:
            return rel
    return None
