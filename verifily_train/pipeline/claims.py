"""Train each (dataset version, training config) once: claims that the trigger and the watcher share.

A claim is ``$VERIFILY_HOME/claims/<key>.json`` with ``key = sha256(dataset content hash, training
config hash)``. The training config hash is the config hash without the dataset reference, so "the
same config on a new version" has one key per version. Claims are created with ``O_EXCL`` (atomic on
one filesystem): whichever path sees a version first trains it, the other finds the claim and skips.
A completed run records its claim too, so a version trained by hand is not trained again by the watcher.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import List, Optional

from verifily_train.config.hashing import hashed_view
from verifily_train.config.schema import TrainConfig
from verifily_train.fsio import atomic_write_json, verifily_home
from verifily_train.hashing import canonical_json
from verifily_train.procs import start_time
from verifily_train.artifacts.run import utc_now
from verifily_train.config.load import load_config
from verifily_train.dataset.store import list_versions
from verifily_train.pipeline.contract import Fingerprint, Validated

CLAIMED, COMPLETED = "claimed", "completed"


def training_config_hash(cfg: TrainConfig) -> str:
    """The config hash with the dataset left out: what 'the same training config' means across versions."""
    view = hashed_view(cfg)
    view.pop("dataset_version", None)
    view.pop("data_paths", None)
    return hashlib.sha256(canonical_json(view).encode("utf-8")).hexdigest()


def load_training_config(config, overrides) -> TrainConfig:
    """A config that names no dataset (the watcher picks the versions); every other problem still raises."""
    problems: list = []
    cfg = load_config(config, overrides or [], collect=problems)
    problems = [p for p in problems if p.key not in ("dataset_version", "data_paths.train")]
    if problems:
        raise problems[0]
    return cfg


def claim_key(data_hash: str, training_hash: str) -> str:
    return hashlib.sha256(f"{data_hash}\n{training_hash}".encode("utf-8")).hexdigest()


def claims_root(home: Optional[Path] = None) -> Path:
    return (home or verifily_home()) / "claims"


def _path(key: str, home: Optional[Path]) -> Path:
    return claims_root(home) / f"{key}.json"


def read_claim(key: str, home: Optional[Path] = None) -> Optional[dict]:
    try:
        return json.loads(_path(key, home).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:  # a claim being written (the O_EXCL create and its content are two steps)
        return {"status": CLAIMED, "key": key}


def _holder() -> dict:
    """Who holds a claim: host, PID and the PID's start time (so a recycled PID is not mistaken for it)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": start_time(pid)}


def _stale(record: dict) -> bool:
    """A claim whose holder died on this host (kill -9, OOM) before completing or releasing it."""
    holder = record.get("holder") or {}
    if record.get("status") != CLAIMED or holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return False
    return start_time(int(holder["pid"])) != holder.get("pid_start")


def claim(key: str, record: dict, home: Optional[Path] = None) -> Optional[dict]:
    """Take the claim for ``key``; returns None when taken, else the existing claim (someone else has it).

    A claim left by a process that died on this host is taken over (renamed away first, so of two
    processes that both find it stale, exactly one wins the ``O_EXCL`` create)."""
    path = _path(key, home)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            existing = read_claim(key, home) or {"status": CLAIMED, "key": key}
            if not _stale(existing):
                return existing
            try:
                os.rename(path, path.with_name(f".stale-{path.name}-{os.getpid()}"))
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(dict(record, key=key, status=CLAIMED, holder=_holder()), handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        return None
    return read_claim(key, home) or {"status": CLAIMED, "key": key}


def complete(key: str, record: dict, home: Optional[Path] = None) -> None:
    """Record a completed run under ``key`` (whether or not it was claimed first)."""
    path = _path(key, home)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, dict(record, key=key, status=COMPLETED))


def complete_run(cfg: TrainConfig, fp: Fingerprint, validated: Validated, written: dict,
                 home: Optional[Path] = None) -> None:
    """Record a completed Run for its dataset version and training config (what ``once`` and compare look up)."""
    ds = validated.dataset
    training_hash = training_config_hash(cfg)
    complete(claim_key(fp.data_hash, training_hash), {
        "run_id": written["run_id"], "run_path": str(Path(written["path"]).resolve()), "dataset_ref": ds["ref"],
        "dataset_id": ds["dataset_id"], "dataset_version": ds["version"],
        "dataset_created_at": ds.get("created_at") or "", "data_hash": fp.data_hash,
        "training_config_hash": training_hash, "completed_at": utc_now()}, home)


def release(key: str, owner: str, home: Optional[Path] = None) -> None:
    """Drop a claim this owner holds and did not complete (the run failed: a later attempt may train it)."""
    current = read_claim(key, home)
    if current and current.get("status") == CLAIMED and current.get("owner") == owner:
        _path(key, home).unlink(missing_ok=True)


def completed_claims(home: Optional[Path] = None) -> List[dict]:
    root = claims_root(home)
    out = []
    for path in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("status") == COMPLETED:
            out.append(record)
    return out


def previous_run(training_hash: str, dataset_id: str, created_at: str, version: str,
                 home: Optional[Path] = None) -> Optional[dict]:
    """The completed claim of the newest earlier version of ``dataset_id`` under the same training config
    (versions ordered as the store orders them: creation time, then name)."""
    this = (created_at, version)
    earlier = [c for c in completed_claims(home)
               if c.get("training_config_hash") == training_hash and c.get("dataset_id") == dataset_id
               and (c.get("dataset_created_at", ""), c.get("dataset_version", "")) < this and c.get("run_path")
               and Path(c["run_path"]).is_dir()]
    return max(earlier, key=lambda c: (c["dataset_created_at"], c.get("dataset_version", ""))) if earlier else None


def pending_versions(training_hash: str, task: str, latest_only: bool = True, datasets: Optional[List[str]] = None,
                     home: Optional[Path] = None) -> List[dict]:
    """Store versions of ``task`` with no claim under this training config (newest per dataset if ``latest_only``)."""
    versions = [v for v in list_versions(home) if v["task"] == task and (not datasets or v["dataset_id"] in datasets)]
    if latest_only:
        newest = {}
        for v in versions:  # list_versions sorts oldest first per dataset
            newest[v["dataset_id"]] = v
        versions = list(newest.values())
    return [v for v in versions if read_claim(claim_key(v["content_hash"], training_hash), home) is None]
