"""The Run artifact (spec §7.3): assembled in a staging folder, renamed into place, then made read-only."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

from verifily_train.config.hashing import hashed_view
from verifily_train.config.schema import TrainConfig
from verifily_train.errors import RunError
from verifily_train.fsio import (atomic_write_json, claim_staging, fsync_dir, make_read_only,
                                 make_writable, release_staging, sweep_abandoned)
from verifily_train.hashing import content_hash, sha256_file
from verifily_train.artifacts.env import source_digest, tool_version
from verifily_train.checksums import CHECKSUMS, parse_checksums, write_checksums  # noqa: F401  (re-exported)
from verifily_train import jsonsafe
from verifily_train.fsio import verifily_home

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


def integrity_root(listing: Path) -> str:
    """``sha256:`` + SHA-256 of the checksum file's bytes: one hash that changes with any byte of any file of
    the Run, and with any file added, removed or renamed (docs/run_artifacts.md)."""
    return "sha256:" + sha256_file(listing)


def ledger_dir() -> Path:
    """``$VERIFILY_HOME/ledger/runs``: each Run's integrity root, written once, before the Run appears."""
    return verifily_home() / "ledger" / "runs"


def index_dir() -> Path:
    """``$VERIFILY_HOME/runs-index``: one ``<run_id>.json`` per Run written on this machine, naming its folder, so a
    run id resolves whatever the working folder (``find_run``, ``list_runs``)."""
    return verifily_home() / "runs-index"


def record_in_index(run_id: str, path: Path) -> None:
    """Name a published (or failed) Run's folder in the run index; a home that cannot be written skips it (the
    Run is in place either way, and still found by its folder)."""
    try:
        folder = index_dir()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / f"{run_id}.json", {"run_id": run_id, "path": str(Path(path).resolve())})
    except OSError:
        pass


def indexed_run(run_id: str) -> Optional[Path]:
    """The folder the run index names for ``run_id``, when it is still a Run there (moved or deleted: None)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", run_id) or run_id.startswith("."):
        return None
    try:
        entry = jsonsafe.loads((index_dir() / f"{run_id}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, jsonsafe.BadJson):
        return None
    path = Path(entry["path"]) if isinstance(entry, dict) and isinstance(entry.get("path"), str) else None
    return path if path is not None and path.name == run_id and (path / "run.json").is_file() else None


def indexed_runs() -> List[Path]:
    """Every Run folder the run index names that is still in place."""
    try:
        names = sorted(p.stem for p in index_dir().glob("*.json"))
    except OSError:
        return []
    return [path for path in map(indexed_run, names) if path is not None]


def record_in_ledger(run_id: str, root: str, files: int) -> Path:
    """Write ``<ledger>/<run_id>.json`` once (never overwritten: a second Run with this id is refused)."""
    import tempfile

    folder = ledger_dir()
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{run_id}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{run_id}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"run_id": run_id, "root": root, "files": files, "written_at": utc_now()}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o444)
        try:
            os.link(tmp, entry)  # atomic and exclusive: fails when an entry for this id exists
        except FileExistsError:
            raise RunError(entry, None, "a run with this id was recorded already; runs are immutable") from None
    finally:
        os.unlink(tmp)
    fsync_dir(folder)
    return entry


def ledger_root(run_id: str) -> Optional[str]:
    """The integrity root recorded for ``run_id``, or None when this machine's ledger has no entry."""
    entry = ledger_dir() / f"{run_id}.json"
    try:
        value = jsonsafe.loads(entry.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except jsonsafe.BadJson as err:
        raise RunError(entry, err.key, f"ledger entry unreadable: {err.problem}") from None
    except (OSError, ValueError) as err:  # ValueError: not UTF-8
        raise RunError(entry, None, f"ledger entry unreadable: {err}") from None
    root = value.get("root") if isinstance(value, dict) else None
    if not isinstance(root, str) or not _HEX64.fullmatch(root.removeprefix("sha256:")):
        raise RunError(entry, "root", "ledger entry holds no integrity root")
    return root


_HEX64 = re.compile(r"[0-9a-f]{64}")


def normalise_root(text: str, key: Optional[str] = "--root") -> str:
    """An integrity root as a person pastes it: the ``sha256:`` prefix optional, either case, surrounding blanks
    ignored; the 64 lower-case hex digits. Anything else is refused as what it is (not a tamper alarm)."""
    value = text.strip()
    if value[:7].lower() == "sha256:":
        value = value[7:].strip()
    value = value.lower()
    if not _HEX64.fullmatch(value):
        shown = text.strip()[:80]
        raise RunError(None, key, f"not an integrity root (sha256: and 64 hex digits, as printed when the run was "
                                  f"written); got {shown!r}")
    return value


def verify_run(root: Path, expected_root: Optional[str] = None, ledger_optional: bool = False) -> int:
    """Check the Run against its integrity root (the ledger's, or ``expected_root`` given out of band), then
    re-hash every file; a changed, missing, extra or linked file is a ``RunError`` naming it. With
    ``ledger_optional`` (a consumer reading a Run written elsewhere) a Run this machine's ledger does not know is
    checked against its own checksums.sha256 alone."""
    root = Path(root)
    listing = root / CHECKSUMS
    if not listing.is_file():
        raise RunError(root, None, f"no {CHECKSUMS}: not a completed run")
    wanted = normalise_root(expected_root) if expected_root is not None else None
    expected = parse_checksums(listing)
    actual_root = integrity_root(listing)
    recorded = wanted if wanted is not None else ledger_root(root.name)
    if recorded is None and ledger_optional:
        recorded = actual_root
    if recorded is None:
        raise RunError(root, None, f"no ledger entry for {root.name} in {ledger_dir()} (a run written on another "
                                   "machine or under another VERIFILY_HOME): give the integrity root printed when "
                                   "it was written with --root")
    if recorded.removeprefix("sha256:") != actual_root.removeprefix("sha256:"):
        where = "the root given with --root" if expected_root is not None else f"its ledger entry ({ledger_dir() / (root.name + '.json')})"
        raise RunError(listing, None, f"does not match {where}: the run's files or their checksums were changed "
                                      "since it was written")
    linked = [p for p in root.rglob("*") if p.is_symlink()]
    if linked:
        raise RunError(linked[0], None, "is a link: a Run holds plain files only")
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


def verify_before_use(root: Path, command: str) -> dict:
    """What every consumer of a Run (``reproduce``, ``compare``, ``attribute``, ``dataset derive``) does before it
    reads one: the Run is completed and passes ``verifily runs verify`` (its ledger entry when this machine has
    one, else its own checksums.sha256); its run.json. A tampered Run is one line naming the file."""
    root = Path(root)
    record = load_run_json(root)
    if record.get("status") != "completed":
        raise RunError(root, None, f"status is {record.get('status')!r}; {command} reads only completed runs")
    try:
        verify_run(root, ledger_optional=True)
    except RunError as err:
        raise RunError(err.where, err.key, f"{err.problem}; {command} refuses a Run that fails "
                                           "`verifily runs verify`") from None
    return record


def publish_run(staging: Path, final: Path) -> Path:
    """Checksum, record the integrity root in the ledger, make read-only and atomically rename a staged run
    into place. The ledger entry comes first: a Run that exists always has one."""
    if final.exists():
        raise RunError(final, None, "already exists; runs are immutable")
    files = write_checksums(staging)
    record_in_ledger(final.name, integrity_root(staging / CHECKSUMS), files)
    make_read_only(staging)
    os.rename(staging, final)
    fsync_dir(final.parent)
    release_staging(staging)
    record_in_index(final.name, final)
    return final


STAGING_PREFIXES = (".staging-", ".failed-")


def staging_dir(runs_dir: Path, run_id: str) -> Path:
    """A hidden folder beside the final place, owned (locked) by this process: no reader ever sees half an
    artifact. Staging folders left by killed runs are deleted first."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    sweep_abandoned(runs_dir, STAGING_PREFIXES)
    path = runs_dir / f".staging-{run_id}"
    if path.exists():
        discard(path)
    return claim_staging(path)


def discard(path: Path) -> None:
    """Delete a staging or work folder, read-only parts included (and drop its ownership lock)."""
    if path.exists():
        make_writable(path)
        shutil.rmtree(path, ignore_errors=True)
    release_staging(path)


def write_failed_run(runs_dir: Path, run_id: str, record: dict, error: BaseException) -> Path:
    """``runs/<run_id>/run.json`` with status failed and the error; nothing in it claims completion."""
    final = runs_dir / run_id
    if final.exists():
        return final
    record = dict(record, run_id=run_id, status="failed", completed_at=utc_now(),
                  error={"type": type(error).__name__, "message": str(error).splitlines()[0] if str(error) else ""})
    staging = runs_dir / f".failed-{run_id}"
    discard(staging)
    runs_dir.mkdir(parents=True, exist_ok=True)
    claim_staging(staging)
    atomic_write_json(staging / "run.json", record)
    os.rename(staging, final)
    release_staging(staging)
    record_in_index(run_id, final)
    return final


def runs_dirs(runs_dir: Optional[str | Path] = None) -> List[Path]:
    """Where runs are looked up: the given folder, else ``runs/`` here and ``$VERIFILY_HOME/runs``
    (where deployment runs land)."""
    if runs_dir is not None:
        return [Path(runs_dir)]
    out: List[Path] = []
    for candidate in (Path("runs"), verifily_home() / "runs"):
        if all(candidate.resolve() != p.resolve() for p in out):
            out.append(candidate)
    return out


def find_run(ref: str, runs_dir: Optional[str | Path] = None) -> Path:
    """A run id (looked up in ``runs_dirs(runs_dir)``) or a path to a run folder."""
    if "\x00" in ref or len(ref) > 4096 or any(len(part.encode("utf-8", "replace")) > 255 for part in ref.split("/")):
        raise RunError(ref[:60] + ("..." if len(ref) > 60 else ""), None, "not a run id or run folder (a NUL byte, "
                                                                         "or too long)")
    path = Path(ref)
    if path.name.startswith(STAGING_PREFIXES):
        raise RunError(ref, None, "is a staging folder (a run being written, or debris of a killed one), not a Run")
    if path.is_dir() and (path / "run.json").is_file():
        return path
    folders = runs_dirs(runs_dir)
    for folder in folders:
        candidate = folder / ref
        if candidate.is_dir() and (candidate / "run.json").is_file():
            return candidate
    indexed = indexed_run(ref) if runs_dir is None else None
    if indexed is not None:  # a run made in another folder, found through $VERIFILY_HOME/runs-index
        return indexed
    where = " and ".join(f"{f}/" for f in folders) + ("" if runs_dir is not None else " and the run index")
    raise RunError(ref, None, f"no such run (looked in {where}; give a run id or a run folder)")


def load_run_json(root: Path) -> dict:
    path = Path(root) / "run.json"
    try:
        record = jsonsafe.loads(path.read_text(encoding="utf-8"))
    except jsonsafe.BadJson as err:
        raise RunError(path, err.key, err.problem) from None
    except (OSError, ValueError) as err:
        raise RunError(path, None, f"cannot read: {err}") from None
    if not isinstance(record, dict):
        raise RunError(path, None, f"must be a JSON object, got {type(record).__name__}")
    return record


def _headline(metrics: dict) -> str:
    for key in ("loss", "accuracy"):
        if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool):
            return f"{key}={metrics[key]:.4f}"
    return "-"


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def list_runs(runs_dir: Optional[str | Path] = None) -> List[dict]:
    """Every run folder (completed or failed) in ``runs_dirs(runs_dir)``, newest first."""
    out = []
    paths = [p for root in runs_dirs(runs_dir) if root.is_dir() for p in root.iterdir()]
    if runs_dir is None:  # and every run the run index names, made in any folder
        seen = {p.resolve() for p in paths}
        paths += [p for p in indexed_runs() if p.resolve() not in seen]
    for path in paths:
        if path.name.startswith(".") or not (path / "run.json").is_file():
            continue
        try:
            run = load_run_json(path)
        except RunError:  # one unreadable run.json is shown as such; it cannot hide the others
            out.append({"run_id": path.name, "status": "unreadable", "task": "?", "base_model": "?", "dataset": "?",
                        "headline": "-", "started_at": "", "path": str(path)})
            continue
        job = _mapping(run.get("job"))
        dataset = _mapping(job.get("dataset_version"))
        out.append({
            "run_id": str(run.get("run_id", path.name)), "status": str(run.get("status", "?")),
            "task": str(job.get("task", "?")), "base_model": Path(str(job.get("base_model", "?"))).name,
            "dataset": str(dataset.get("ref", "?")),
            "headline": _headline(_mapping(run.get("metrics"))), "started_at": str(run.get("started_at", "")),
            "path": str(path),
        })
    out.sort(key=lambda r: r["started_at"], reverse=True)
    return out
