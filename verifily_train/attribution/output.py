"""The outputs of ``verifily attribute RUN --by KEY``: attribution.json and attribution.html, staged,
checksummed and read-only; and the one reader of any attribution folder's attribution.json, which checks them.

The tag-level folder (``attributions/<run>-by-<key>/``) also holds the ablation Runs (``runs/``, each a Run of
its own) and an identical later call writes it again, so it cannot be one immutable rename like a Run or a
``--rows`` folder (``pipeline/row_output.publish``). Its outputs are written in a ``.staging-attribution-*``
folder beside them, read-only; then the old ``checksums.sha256`` goes first (a reader sees an incomplete folder, never a mix),
each file is renamed into place, and the new checksum listing of those files is renamed in last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

from verifily_train import jsonsafe
from verifily_train.checksums import CHECKSUMS, parse_checksums, write_checksums
from verifily_train.errors import RunError
from verifily_train.fsio import atomic_write_json, atomic_write_text, fsync_dir
from verifily_train.hashing import sha256_file

RESULT = "attribution.json"
REPORT = "attribution.html"


def publish_outputs(folder: Path, result: Mapping[str, object], report_html: str) -> Path:
    """attribution.json, attribution.html and their checksums into ``folder``: staged, read-only, listing last."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-attribution-", dir=folder))
    try:
        atomic_write_json(staging / RESULT, dict(result))
        atomic_write_text(staging / REPORT, report_html)
        write_checksums(staging)
        for name in (RESULT, REPORT, CHECKSUMS):
            os.chmod(staging / name, 0o444)
        with_listing = folder / CHECKSUMS
        if with_listing.exists():
            os.unlink(with_listing)
        for name in (RESULT, REPORT, CHECKSUMS):  # the listing last: it marks the folder complete
            os.replace(staging / name, folder / name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # empty once published; what a failure left, otherwise
    return folder


def load_attribution(folder: Path) -> dict:
    """attribution.json of a complete attribution folder (tag-level or ``--rows``), every listed file checked
    against its checksum first: a changed byte is a ``RunError`` naming the file."""
    folder = Path(folder)
    listing = folder / CHECKSUMS
    if not listing.is_file() or not (folder / RESULT).is_file():
        raise RunError(folder, None, f"no {CHECKSUMS} and {RESULT}: not a complete attribution folder")
    expected = parse_checksums(listing)
    if RESULT not in expected:
        raise RunError(folder / RESULT, None, f"not listed in {CHECKSUMS}")
    for rel in sorted(expected):
        path = folder / rel
        if not path.is_file():
            raise RunError(path, None, f"missing (listed in {CHECKSUMS})")
        if sha256_file(path) != expected[rel]:
            raise RunError(path, None, "changed since the attribution was written (sha256 mismatch)")
    return jsonsafe.load_file(folder / RESULT, RunError, expect=dict)
