"""Content-addressed stage cache: ``<cache>/<stage>/<key>/`` holds a stage's files, manifest and checksums.

An entry is built in a temporary folder and renamed into place, under a per-key file lock, so two
runs computing the same key end with one valid entry. A hit whose files are missing or fail their
checksums is a miss: it is recomputed, never trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional

from verifily_train.checksums import CHECKSUMS, first_mismatch, parse_checksums, write_checksums
from verifily_train.errors import VerifilyError
from verifily_train.fsio import atomic_write_json, key_lock, fsync_dir, make_writable, verifily_home
from verifily_train.hashing import hash_tree

MANIFEST = "stage.json"


def cache_root(configured: Optional[str] = None) -> Path:
    """``cache.dir`` when set, else ``$VERIFILY_HOME/cache``."""
    return Path(os.path.expanduser(configured)) if configured else verifily_home() / "cache"


@dataclass(frozen=True)
class CacheMode:
    read: bool = True  # use valid entries
    write: bool = True  # store new entries

    @classmethod
    def from_flags(cls, enabled: bool, refresh: bool) -> "CacheMode":
        if not enabled:
            return cls(read=False, write=False)
        return cls(read=not refresh, write=True)


def entry_is_valid(folder: Path) -> bool:
    """Every listed file present with its recorded hash, and the stage manifest readable."""
    listing = folder / CHECKSUMS
    if not (folder / MANIFEST).is_file() or not listing.is_file():
        return False
    try:
        if first_mismatch(folder, parse_checksums(listing)) is not None:
            return False
        json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, VerifilyError):
        return False
    return True


# Entries this process uses (read or computes) in the current flow run: a shared lock on
# ``<stage>/.locks/<key>.inuse`` each, held until the ``holding()`` block around the run ends (or
# ``release_held``, or this process dies).
# ``prune``/``cache clear`` take the lock exclusively before deleting, so they skip what a live run holds.
_HELD: List[int] = []


def hold(root: Path, stage: str, key: str) -> None:
    """Mark ``key``'s entry (and its scratch folders) as in use by this process until :func:`release_held`."""
    lock_dir = root / stage / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{key}.inuse", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _HELD.append(fd)


def hold_stages(root: Path, record: dict, stages) -> None:
    """Hold the entries of ``stages`` a Run's record names (``record["stages"][stage]["key"]``): a command that
    reads a Run's cached inputs (row attribution: its tokenized rows, its train stage's snapshots) keeps
    ``cache clear`` off them until it ends."""
    for stage in stages:
        key = ((record.get("stages") or {}).get(stage) or {}).get("key")
        if key:
            hold(root, stage, str(key))


def hold_exclusive(root: Path, stage: str, key: str) -> None:
    """One writer of the output named by ``key`` at a time, until :func:`release_held`: an exclusive lock on
    ``<stage>/.locks/<key>.lock`` (a second identical call waits for the first, then finds its output)."""
    lock_dir = root / stage / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _HELD.append(fd)


def release_held() -> None:
    """Drop every in-use mark this process holds (a flow run ended); ``pipeline/row_orchestrate.attribute_rows``
    still ends with it, everything else uses :func:`holding`."""
    while _HELD:
        os.close(_HELD.pop())


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """Every in-use mark and writer lock taken inside the block (:func:`hold`, :func:`hold_exclusive`, a stage
    read or computed) is dropped when it ends, however it ends: the caller releases nothing."""
    mark = len(_HELD)
    try:
        yield
    finally:
        while len(_HELD) > mark:
            os.close(_HELD.pop())


@contextlib.contextmanager
def _unless_in_use(stage_dir: Path, key: Optional[str]) -> Iterator[bool]:
    """Yields True while holding ``key``'s in-use lock exclusively (no live run holds it: delete now; a run
    that starts meanwhile waits, then finds no entry), False when a live run holds it."""
    if not key or not (stage_dir / ".locks").is_dir():  # no run ever locked here (replay records, charts)
        yield True
        return
    fd = os.open(stage_dir / ".locks" / f"{key}.inuse", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing drops the lock


_SCRATCH = re.compile(r"\.(?:tmp|trash|private)-([0-9a-f]{64})-[0-9a-f]+|\.work-([0-9a-f]{64})|([0-9a-f]{64})(?:\.json)?")


def _key_of(name: str) -> Optional[str]:
    """The cache key an entry, scratch folder or record is named after (None: not one of ours)."""
    match = _SCRATCH.fullmatch(name)
    return next((g for g in match.groups() if g), None) if match else None


def _discard(path: Path) -> None:
    if path.exists():
        make_writable(path)
        shutil.rmtree(path, ignore_errors=True)


def work_dir(root: Path, stage: str, key: str) -> Path:
    """A stage's resumable scratch folder, keyed like its entry (train checkpoints live here)."""
    path = root / stage / f".work-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_cached(stage: str, key: str, root: Path, mode: CacheMode,
               compute: Callable[[Path, Path], dict]) -> dict:
    """Return the stage manifest for ``key``, from a valid entry or by ``compute(out_dir, work_dir)``.

    The returned manifest carries ``key``, ``output_hash``, ``cache_hit``, ``seconds`` and ``dir``.
    """
    started = time.perf_counter()
    hold(root, stage, key)  # before the hit check: a prune racing it deletes first (a miss) or skips the entry
    if not mode.write:  # cache off: compute in a private folder that nothing else reads
        private = root / stage / f".private-{key}-{uuid.uuid4().hex[:10]}"
        out, work = private / "out", private / "work"
        out.mkdir(parents=True)
        work.mkdir(parents=True)
        try:
            manifest = compute(out, work)
        except BaseException:
            _discard(private)
            raise
        return dict(as_stored(dict(manifest, key=key, output_hash=hash_tree(out))), cache_hit=False,
                    seconds=round(time.perf_counter() - started, 3), dir=str(out), private=str(private))
    final = root / stage / key
    with key_lock(root, stage, key):
        if mode.read and entry_is_valid(final):
            return _hit(final, started)
        tmp = root / stage / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            manifest = compute(tmp, work_dir(root, stage, key))
            manifest = dict(manifest, key=key, output_hash=hash_tree(tmp))
            atomic_write_json(tmp / MANIFEST, manifest)
            write_checksums(tmp)
            if final.exists():  # a stale or refreshed entry: move it aside, then swap in the new one
                trash = root / stage / f".trash-{key}-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                _discard(trash)
            os.rename(tmp, final)
            fsync_dir(final.parent)
        finally:
            _discard(tmp)
        _discard(root / stage / f".work-{key}")  # checkpoints are no longer needed once the entry exists
    return dict(as_stored(manifest), cache_hit=False, seconds=round(time.perf_counter() - started, 3), dir=str(final))


def as_stored(manifest: dict) -> dict:
    """The manifest as a later hit reads it back (JSON, keys sorted): a computed stage and its cache hit (a
    replay) hand the Run, the summary and the UI the same values in the same order."""
    return json.loads(json.dumps(manifest, sort_keys=True, ensure_ascii=False))


def lookup(stage: str, key: str, root: Path) -> Optional[dict]:
    """The manifest of a valid entry (every file checked), marked as a cache hit; None when missing or damaged."""
    final = root / stage / key
    if not final.is_dir():
        return None
    started = time.perf_counter()
    hold(root, stage, key)
    with key_lock(root, stage, key):
        return _hit(final, started) if entry_is_valid(final) else None


def _hit(final: Path, started: float) -> dict:
    manifest = json.loads((final / MANIFEST).read_text(encoding="utf-8"))
    return dict(manifest, cache_hit=True, seconds=round(time.perf_counter() - started, 3), dir=str(final))


def list_entries(root: Path) -> List[dict]:
    """Every entry: stage, key, size, age, and whether it still verifies."""
    out = []
    if not root.is_dir():
        return out
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for entry in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            out.append({"stage": stage_dir.name, "key": entry.name, "bytes": size,
                        "modified": entry.stat().st_mtime, "path": str(entry)})
    return out


def prune(root: Path, older_than_days: Optional[float] = None, kept: Optional[List[str]] = None) -> int:
    """Delete entries (and stale scratch folders, replay records and charts) last written more than N days ago;
    all when N is None. What a live run holds (:func:`hold`) is kept, and listed in ``kept``. Returns the
    number of entry folders removed."""
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    removed = 0
    if not root.is_dir():
        return 0
    for stage_dir in (p for p in root.iterdir() if p.is_dir()):
        for entry in stage_dir.iterdir():  # entry folders; replay records and charts are single files
            if entry.name == ".locks" or not (entry.is_dir() or entry.suffix == ".json"):
                continue
            with _unless_in_use(stage_dir, _key_of(entry.name)) as free:
                if not free:
                    if kept is not None:
                        kept.append(str(entry))
                    continue
                if cutoff is None or entry.stat().st_mtime < cutoff:
                    if entry.is_dir():
                        _discard(entry)
                        removed += 1
                    else:
                        entry.unlink(missing_ok=True)
    return removed


def discard_private(folders: Iterable[Optional[str]]) -> None:
    """Delete the private folders of a cache-off run's stages (nothing else reads them)."""
    for folder in folders:
        if folder:
            _discard(Path(folder))
