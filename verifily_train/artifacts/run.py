"""The Run artifact (spec §7.3): assembled in a staging folder, renamed into place, then made read-only."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from verifily_train.config.loader import hashed_view
from verifily_train.config.schema import TrainConfig
from verifily_train.errors import RunError
from verifily_train.fsio import atomic_write_json, atomic_write_text, fsync_dir, make_read_only, make_writable
from verifily_train.hashing import content_hash, sha256_file
from verifily_train.identity import source_digest, tool_version

CHECKSUMS = "checksums.sha256"
RUN_SCHEMA_VERSION = 1


def new_run_id(now: Optional[datetime] = None) -> str:
    """``run_YYYYMMDD_HHMMSS_<6 hex>`` (UTC)."""
    now = now or datetime.now(timezone.utc)
    return f"run_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(3)}"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


REPRODUCIBILITY_VERSION = "reproducibility/2"
# Config keys left out of the reproducibility view (on top of schema.UNHASHED_KEYS): each is either a
# location or request that a component below replaces with what it resolved to, or an output form.
REPLACED_IN_VIEW = (
    "base_model",  # a path or Hub id: replaced by model_identity (and tokenizer_identity)
    "eval.gold_set",  # a path: replaced by gold_set_sha256
    "compute.device",  # a request (auto, cuda, ...): replaced by device_kind
    "compute.fp16",  # requests: replaced by the precision that really ran
    "compute.bf16",
    "output.save_adapter_only",  # whether merged weights are also written: the weights are the same
)


def reproducibility_config_view(cfg: TrainConfig) -> dict:
    """The hashed config view minus ``REPLACED_IN_VIEW``: settings only, no locations."""
    data = hashed_view(cfg)
    for dotted in REPLACED_IN_VIEW:
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return data


def reproducibility_components(cfg: TrainConfig, *, data_hash: str, model_identity: str,
                               tokenizer_identity: Optional[str], env_hash: str, device: str, precision: str,
                               gpu_name: Optional[str] = None, cuda_version: Optional[str] = None) -> dict:
    """Everything that can change a run's weights or metrics, by identity (bytes, commits, versions), never by path."""
    gold = cfg.eval.gold_set
    return {
        "config_view_hash": content_hash(reproducibility_config_view(cfg)),
        "data_hash": data_hash,
        "model_identity": model_identity,
        "tokenizer_identity": tokenizer_identity,
        "gold_set_sha256": sha256_file(gold) if gold else None,
        "tool_version": tool_version(),
        "source_digest": source_digest(),
        "env_hash": env_hash,
        "device_kind": device,
        "gpu_name": gpu_name,
        "cuda_version": cuda_version,
        "precision": precision,
    }


def reproducibility_hash(components: dict) -> str:
    """Hex SHA-256 of the canonical JSON of ``[REPRODUCIBILITY_VERSION, components]``."""
    return content_hash(REPRODUCIBILITY_VERSION, components)


def write_checksums(root: Path) -> int:
    """``sha256  relative/path`` for every file under ``root`` except the checksum file itself."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != CHECKSUMS:
            lines.append(f"{sha256_file(path)}  {rel}")
    atomic_write_text(root / CHECKSUMS, "\n".join(lines) + "\n")
    return len(lines)


def verify_run(root: Path) -> int:
    """Re-hash every file; a changed, missing or extra file is a ``RunError`` naming it."""
    root = Path(root)
    listing = root / CHECKSUMS
    if not listing.is_file():
        raise RunError(root, None, f"no {CHECKSUMS}: not a completed run")
    expected: Dict[str, str] = {}
    for lineno, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise RunError(listing, f"line {lineno}", "malformed checksum line")
        expected[rel] = digest
    actual = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {CHECKSUMS}
    for rel in sorted(expected):
        path = root / rel
        if not path.is_file():
            raise RunError(root / rel, None, "missing (listed in checksums.sha256)")
        if sha256_file(path) != expected[rel]:
            raise RunError(root / rel, None, "changed since the run was written (sha256 mismatch)")
    extra = sorted(actual - set(expected))
    if extra:
        raise RunError(root / extra[0], None, "not part of the run (absent from checksums.sha256)")
    return len(expected)


def publish_run(staging: Path, final: Path) -> Path:
    """Checksum, make read-only and atomically rename a staged run into place."""
    if final.exists():
        raise RunError(final, None, "already exists; runs are immutable")
    write_checksums(staging)
    make_read_only(staging)
    os.rename(staging, final)
    fsync_dir(final.parent)
    return final


def staging_dir(runs_dir: Path, run_id: str) -> Path:
    """A hidden folder beside the final place: no reader ever sees half an artifact."""
    path = runs_dir / f".staging-{run_id}"
    if path.exists():
        discard(path)
    path.mkdir(parents=True)
    return path


def discard(path: Path) -> None:
    """Delete a staging or work folder, read-only parts included."""
    if path.exists():
        make_writable(path)
        shutil.rmtree(path, ignore_errors=True)


def write_failed_run(runs_dir: Path, run_id: str, record: dict, error: BaseException) -> Path:
    """``runs/<run_id>/run.json`` with status failed and the error; nothing in it claims completion."""
    final = runs_dir / run_id
    if final.exists():
        return final
    record = dict(record, run_id=run_id, status="failed", completed_at=utc_now(),
                  error={"type": type(error).__name__, "message": str(error).splitlines()[0] if str(error) else ""})
    staging = runs_dir / f".failed-{run_id}"
    discard(staging)
    staging.mkdir(parents=True)
    atomic_write_json(staging / "run.json", record)
    os.rename(staging, final)
    return final


def runs_dirs(runs_dir: Optional[str | Path] = None) -> List[Path]:
    """Where runs are looked up: the given folder, else ``runs/`` here and ``$VERIFILY_HOME/runs``
    (where deployment runs land)."""
    if runs_dir is not None:
        return [Path(runs_dir)]
    from verifily_train.fsio import verifily_home

    out: List[Path] = []
    for candidate in (Path("runs"), verifily_home() / "runs"):
        if all(candidate.resolve() != p.resolve() for p in out):
            out.append(candidate)
    return out


def find_run(ref: str, runs_dir: Optional[str | Path] = None) -> Path:
    """A run id (looked up in ``runs_dirs(runs_dir)``) or a path to a run folder."""
    path = Path(ref)
    if path.is_dir() and (path / "run.json").is_file():
        return path
    folders = runs_dirs(runs_dir)
    for folder in folders:
        candidate = folder / ref
        if candidate.is_dir() and (candidate / "run.json").is_file():
            return candidate
    where = " and ".join(f"{f}/" for f in folders)
    raise RunError(ref, None, f"no such run (looked in {where}; give a run id or a run folder)")


def load_run_json(root: Path) -> dict:
    try:
        return json.loads((Path(root) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunError(Path(root) / "run.json", None, f"cannot read: {err}") from None


def _headline(metrics: dict) -> str:
    for key in ("loss", "accuracy"):
        if isinstance(metrics.get(key), (int, float)):
            return f"{key}={metrics[key]:.4f}"
    return "-"


def list_runs(runs_dir: Optional[str | Path] = None) -> List[dict]:
    """Every run folder (completed or failed) in ``runs_dirs(runs_dir)``, newest first."""
    out = []
    paths = [p for root in runs_dirs(runs_dir) if root.is_dir() for p in root.iterdir()]
    for path in paths:
        if path.name.startswith(".") or not (path / "run.json").is_file():
            continue
        try:
            run = load_run_json(path)
        except RunError:
            continue
        job = run.get("job", {})
        out.append({
            "run_id": run.get("run_id", path.name), "status": run.get("status", "?"), "task": job.get("task", "?"),
            "base_model": Path(str(job.get("base_model", "?"))).name,
            "dataset": job.get("dataset_version", {}).get("ref", "?"),
            "headline": _headline(run.get("metrics", {})), "started_at": run.get("started_at", ""),
            "path": str(path),
        })
    out.sort(key=lambda r: r["started_at"], reverse=True)
    return out
