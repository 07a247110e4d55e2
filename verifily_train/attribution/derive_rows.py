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

from verifily_train import jsonsafe
from verifily_train.attribution.derive import bounded_name, safe_part, store_derived, train_lines, version_stem
from verifily_train.dataset.rows import iter_jsonl
from verifily_train.errors import DataError, VerifilyError
from verifily_train.fsio import read_user_file
from verifily_train.hashing import content_hash
from verifily_train.model.tokenize import example_id, row_hash

HASH = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")


def train_row_identities(dv) -> List[Tuple[str, str]]:
    """(example id, row hash) of every train row, in the order the derivation reads the rows."""
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


MAX_ROW_LIST_BYTES = 64 * 1024 * 1024  # ~1M row hashes: far past any train split a row list names


def read_row_list(path: Path) -> List[str]:
    """Row ids or hashes from a file: one per line (blank lines and ``#`` comments skipped), a JSON list, or a
    Parquet table with a ``row_hash`` (else ``example_id``) column, such as ``row_attribution.parquet``. Read
    through the bounded reader: ``/dev/zero`` is refused after 64 MiB, not read to the end."""
    data = read_user_file(path, "--drop-rows", MAX_ROW_LIST_BYTES, DataError)
    if data.startswith(b"PAR1"):
        return _parquet_row_list(path, data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(str(path), None, f"not valid UTF-8 text ({err.reason} at byte {err.start}): one row id "
                                         "or row hash per line, a JSON list, or a Parquet table") from None
    if text.lstrip().startswith("["):
        try:
            items = jsonsafe.loads(text)
        except jsonsafe.BadJson as err:
            raise DataError(str(path), err.key, f"not a JSON list of row ids: {err.problem}") from None
        if not isinstance(items, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in items):
            raise DataError(str(path), None, "not a JSON list of row ids (strings)")
        refs = [str(x) for x in items]
    else:
        refs = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not refs:
        raise DataError(str(path), None, "names no rows (one row id or row hash per line)")
    return refs


def _parquet_row_list(path: Path, data: bytes) -> List[str]:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(io.BytesIO(data))
        column = next((c for c in ("row_hash", "example_id") if c in source.schema_arrow.names), None)
        if column is None:
            raise DataError(str(path), None, "a Parquet table without a row_hash or example_id column")
        refs = [str(x) for x in source.read(columns=[column]).column(column).to_pylist() if x is not None]
    except (OSError, ValueError, pa.ArrowException) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(str(path), None, f"cannot read as Parquet: {str(err).splitlines()[0][:200]}") from None
    if not refs:
        raise DataError(str(path), None, "names no rows")
    return refs


def rows_digest(hashes: Iterable[str]) -> str:
    """A short name for a set of rows (the version name carries it, the rule lists them)."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode("ascii")).hexdigest()[:10]


def derive_without_rows(dv, drop: Set[str], rule: dict, label: str, home: Optional[Path] = None) -> dict:
    """The derived version of ``dv`` without the train rows whose row hash is in ``drop`` (created once, then reused).

    ``rule`` is recorded in ``derived_from`` (how the rows were chosen, and their hashes); ``label`` names the
    version ``<parent version>-without-<label>``."""
    if not drop:
        raise VerifilyError(None, "--drop-rows", "no rows to drop")
    lines = train_lines(dv)
    keep = [row_hash(json.loads(line)) not in drop for line in lines]
    if keep.count(False) == 0:
        raise VerifilyError(None, "--drop-rows", f"none of the rows is a train row of {dv.ref}")
    rule = dict(rule, row_hashes=sorted(drop))
    # a digest of the whole rule: the same rows chosen by another file or another target are another version,
    # not a clash with the first ("exists but was not derived ... by this rule")
    version = bounded_name(f"{version_stem(dv)}-without-{safe_part(label)}-"
                           f"{content_hash(rule)[:8]}")
    flag = "--drop-rows" if rule.get("by") == "file" else "--drop-top"
    return store_derived(dv, version, {"drop_train_rows": rule}, lines, keep, home, {"rows": len(drop)}, flag=flag)
