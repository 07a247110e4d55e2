"""Derived dataset versions without chosen train rows (``verifily dataset derive RUN --drop-top K | --drop-rows FILE``).

The same mechanism as the tag-level derivations (``attribution/derive.py``): an ordinary hash-addressed
store version whose manifest records ``derived_from: {ref, content_hash, rule}``, val and test copied
unchanged, reused on a second call. Rows are named by row hash (the SHA-256 of the row's canonical JSON,
as ``row_attribution.parquet`` records it) or by example id (the row's ``id``, else ``train:<line>``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, List, Optional, Set, Tuple

from verifily_train.attribution.derive import safe_part, store_derived, train_lines, version_stem
from verifily_train.errors import DataError, VerifilyError

HASH = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")


def train_row_identities(dv) -> List[Tuple[str, str]]:
    """(example id, row hash) of every train row, in the order the derivation reads the rows."""
    from verifily_train.dataset.rows import iter_jsonl
    from verifily_train.model.tokenize import example_id, row_hash

    out = []
    for data_file in dv.split_files("train"):
        for lineno, row in iter_jsonl(Path(data_file.abs_path)):
            out.append((example_id(row, "train", lineno), row_hash(row)))
    return out


def resolve_rows(dv, refs: Iterable[str], where: str) -> Set[str]:
    """The row hashes that ``refs`` (row hashes or example ids, one per item) name; an unknown one is an error."""
    identities = train_row_identities(dv)
    hashes = {h for _, h in identities}
    by_id = {}
    for eid, h in identities:
        by_id.setdefault(eid, set()).add(h)
    chosen: Set[str] = set()
    for n, ref in enumerate(refs, start=1):
        ref = ref.strip()
        match = HASH.match(ref.lower())
        if match and match.group(1) in hashes:
            chosen.add(match.group(1))
        elif ref in by_id:
            chosen |= by_id[ref]
        else:
            raise DataError(f"{where}:{n}", None, f"{ref!r} is neither a row hash nor an example id of a train row "
                                                  f"of {dv.ref}")
    return chosen


def read_row_list(path: Path) -> List[str]:
    """Row ids or hashes from a file: one per line (blank lines and ``#`` comments skipped), or a JSON list."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(str(path), None, f"cannot read: {err.strerror or err}") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as err:
            raise DataError(str(path), None, f"not a JSON list of row ids: {err}") from None
        refs = [str(x) for x in items]
    else:
        refs = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not refs:
        raise DataError(str(path), None, "names no rows (one row id or row hash per line)")
    return refs


def rows_digest(hashes: Iterable[str]) -> str:
    """A short name for a set of rows (the version name carries it, the rule lists them)."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode("ascii")).hexdigest()[:10]


def derive_without_rows(dv, drop: Set[str], rule: dict, label: str, home: Optional[Path] = None) -> dict:
    """The derived version of ``dv`` without the train rows whose row hash is in ``drop`` (created once, then reused).

    ``rule`` is recorded in ``derived_from`` (how the rows were chosen, and their hashes); ``label`` names the
    version ``<parent version>-without-<label>``."""
    from verifily_train.model.tokenize import row_hash

    if not drop:
        raise VerifilyError(None, "--drop-rows", "no rows to drop")
    lines = train_lines(dv)
    keep = [row_hash(json.loads(line)) not in drop for line in lines]
    if keep.count(False) == 0:
        raise VerifilyError(None, "--drop-rows", f"none of the rows is a train row of {dv.ref}")
    rule = dict(rule, row_hashes=sorted(drop))
    version = f"{version_stem(dv)}-without-{safe_part(label)}"[:128]
    return store_derived(dv, version, {"drop_train_rows": rule}, lines, keep, home, {"rows": len(drop)})
