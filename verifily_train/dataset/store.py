"""The local dataset store: ``$VERIFILY_HOME/datasets/<dataset_id>/<version>/``, one read-only folder per version."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import List, Optional, Tuple

from verifily_train.config.schema import TASKS
from verifily_train.dataset.columns import check_columns, map_jsonl, mapped_data_paths
from verifily_train.dataset.manifest import build_manifest, load_manifest
from verifily_train.dataset.rows import copy_jsonl
from verifily_train.dataset.version import DatasetVersion
from verifily_train import jsonsafe
from verifily_train.errors import DatasetExistsError, DatasetNotFoundError, DataError, ManifestError, VerifilyError
from verifily_train.fsio import (atomic_write_json, check_writable_folder, claim_staging, fsync_dir, make_read_only,
                                 make_writable, release_staging, sweep_abandoned, verifily_home)
from verifily_train.dataset.convert import (JSONL, SPLIT_NAMES, convert_split, dataset_dict_split, is_dataset_dict,
                                           source_format)
from verifily_train.dataset.manifest import dataset_files_from_paths, dataset_from_paths
from verifily_train.hashing import dataset_content_hash

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def store_root(home: Optional[Path] = None) -> Path:
    """Folder holding every dataset of the store."""
    return (home or verifily_home()) / "datasets"


def _check_name(kind: str, value: str) -> None:
    if not _NAME.fullmatch(value) or value in ("latest",) or value.startswith("sha256"):  # fullmatch: "v1\n" too
        raise VerifilyError(None, kind, f"{value!r} is not a valid name (letters, digits, . _ -; not 'latest' or 'sha256...')")


def create_version(
    dataset_id: str,
    version: str,
    task: str,
    train: str,
    val: Optional[str] = None,
    test: Optional[str] = None,
    home: Optional[Path] = None,
    derived_from: Optional[dict] = None,
    columns: Optional[dict] = None,
) -> DatasetVersion:
    """Copy splits into a new, read-only version folder with a verified manifest; never overwrites.

    A split may be JSONL, Parquet, CSV or a ``datasets`` ``save_to_disk`` folder (converted to JSONL,
    ``dataset.convert``); a ``DatasetDict`` folder as ``train`` also supplies its val and test splits.
    ``derived_from`` (a parent reference, its content hash and the rule that derived this version) is
    recorded in the manifest, so a derived version is reproducible from its parent. ``columns`` (``{field:
    your_column}``) renames the source's own field names before the rows are validated, and is recorded."""
    _check_name("--id", dataset_id)
    _check_name("--version", version)
    if task not in TASKS:
        raise VerifilyError(None, "--task", f"must be one of {', '.join(TASKS)}; got {task!r}")
    columns = check_columns(columns, task, "verifily dataset create", "--columns")
    sources = _split_sources({"train": train, "val": val, "test": test})
    check_writable_folder(store_root(home), "VERIFILY_HOME")
    final = store_root(home) / dataset_id / version
    if final.exists():
        raise DatasetExistsError(final, None, f"{dataset_id}@{version} already exists; versions are immutable, pick a new --version")
    created = [p for p in (final.parent, final.parent.parent) if not p.exists()]  # removed again if this fails
    for attempt in range(3):  # a failed create of another version may remove the empty parent meanwhile
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging = claim_staging(final.parent / f".staging-{version}-{uuid.uuid4().hex[:8]}")
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    sweep_abandoned(final.parent, (".staging-",))  # copies left by a killed dataset create
    try:
        placed, converted, given = [], [], {}
        for split, p in sources:
            dest = staging / f"{split}.jsonl"
            if source_format(p) == JSONL:
                copy_jsonl(p, dest)  # bounded per line: /dev/zero is refused, not copied until the disk is full
            else:
                converted.append(dict(convert_split(p, task, dest, columns), split=split))
            if columns and source_format(p) == JSONL:
                map_jsonl(dest, dest, columns, str(p))
            placed.append((split, dest.name, dest))
            given[dest.name] = str(p)
        manifest, _ = build_manifest(dataset_id, version, task, placed, sources=given)
        if converted:  # provenance only: the content hash is over the JSONL the store keeps
            manifest["converted_from"] = converted
        if derived_from is not None:
            manifest["derived_from"] = derived_from
        if columns:  # provenance only: the rows the store keeps already use the tool's field names
            manifest["columns"] = columns
        atomic_write_json(staging / "manifest.json", manifest)
        make_read_only(staging)
        try:
            os.rename(staging, final)  # atomic; fails if another process created the version meanwhile
        except OSError:
            raise DatasetExistsError(final, None, f"{dataset_id}@{version} already exists; versions are immutable") from None
        fsync_dir(final.parent)
    finally:
        if staging.exists():
            make_writable(staging)
            shutil.rmtree(staging, ignore_errors=True)
        release_staging(staging)
        for folder in created if not final.exists() else []:
            try:
                folder.rmdir()  # a failed first version leaves no empty datasets/<id>/ behind
            except OSError:
                break  # another version (or dataset) is being created meanwhile
    return load_manifest(final / "manifest.json")


def _split_sources(given: dict) -> List[Tuple[str, Path]]:
    """(split, path) for each given split; a DatasetDict folder resolves to its split's sub-folder."""
    given = dict(given)
    train = Path(given["train"])
    if is_dataset_dict(train):  # --train DICT: its own val/test splits unless given separately
        for split in ("val", "test"):
            if not given[split] and dataset_dict_split(train, split) is not None:
                given[split] = given["train"]
    sources = []
    for split, value in given.items():
        if not value:
            continue
        path = Path(value)
        if not path.exists():
            raise DataError(value, None, f"--{split}: file not found")
        if is_dataset_dict(path):
            folder = dataset_dict_split(path, split)
            if folder is None:
                raise DataError(value, None, f"--{split}: the DatasetDict has no {split} split "
                                             f"({' / '.join(_split_names(split))})")
            path = folder
        sources.append((split, path))
    return sources


def _split_names(split: str):
    return SPLIT_NAMES[split]


def list_versions(home: Optional[Path] = None, unreadable: Optional[List[dict]] = None) -> List[dict]:
    """Every version in the store (read from manifests, not re-verified), oldest first per dataset.

    A version whose manifest cannot be read as one (not an object, fields of the wrong type, bad JSON) is
    left out, so one bad folder cannot hide the good ones; with ``unreadable``, each is appended to it as
    ``{"ref", "manifest_path", "problem"}``."""
    out = []
    root = store_root(home)
    if not root.is_dir():
        return out
    for ds_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for v_dir in sorted(ds_dir.iterdir()):
            manifest = v_dir / "manifest.json"
            if v_dir.name.startswith(".") or not manifest.is_file():
                continue
            ref = f"{ds_dir.name}@{v_dir.name}"
            try:
                out.append(dict(_listing(manifest), ref=ref, dataset_id=ds_dir.name, version=v_dir.name,
                                manifest_path=str(manifest)))
            except ManifestError as err:
                if unreadable is not None:
                    unreadable.append({"ref": ref, "manifest_path": str(manifest), "problem": str(err)})
    out.sort(key=lambda r: (r["dataset_id"], r["created_at"], r["version"]))
    return out


def _listing(manifest: Path) -> dict:
    """The fields ``dataset list`` shows, type-checked (a ``ManifestError`` when the manifest is not usable)."""
    try:
        data = jsonsafe.loads(manifest.read_text(encoding="utf-8"))
    except jsonsafe.BadJson as err:
        raise ManifestError(manifest, err.key, err.problem) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(manifest, None, f"cannot read: {err}") from None
    if not isinstance(data, dict):
        raise ManifestError(manifest, None, f"must be a JSON object, got {type(data).__name__}")
    fields = {"task": (str, "?"), "num_rows": (int, 0), "content_hash": (str, ""), "created_at": (str, ""),
              "tag_keys": (list, [])}
    listing = {}
    for name, (kind, default) in fields.items():
        value = data.get(name, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ManifestError(manifest, name, f"must be a {kind.__name__}, got {type(value).__name__}")
        listing[name] = value
    if not all(isinstance(k, str) for k in listing["tag_keys"]):
        raise ManifestError(manifest, "tag_keys", "must be a list of tag key names")
    return listing


def resolve_manifest_path(ref: str, home: Optional[Path] = None) -> Path:
    """``ds_x@v3``, ``ds_x@latest``, ``ds_x@sha256:<hex prefix>`` or a manifest path -> manifest.json path."""
    if "\x00" in ref or len(ref) > 4096:
        raise DatasetNotFoundError(ref[:60] + "...", None, "not a dataset reference (a NUL byte, or too long)")
    as_path = Path(os.path.expanduser(ref))
    try:
        is_dir = as_path.is_dir()
        if ref.endswith(".json") or is_dir or "@" not in ref:
            if is_dir:
                as_path = as_path / "manifest.json"
            if not as_path.is_file():
                raise DatasetNotFoundError(ref, None, "no such manifest; a dataset reference looks like ds_x@v3, ds_x@latest or path/to/manifest.json")
            return as_path
    except OSError as err:
        raise DatasetNotFoundError(ref, None, f"not a usable path: {err.strerror or err}") from None
    dataset_id, _, version = ref.partition("@")
    unreadable: List[dict] = []
    versions = [v for v in list_versions(home, unreadable) if v["dataset_id"] == dataset_id]
    broken = [u for u in unreadable if u["ref"].partition("@")[0] == dataset_id]
    for u in broken:
        if u["ref"] == ref:  # named exactly: loading it reports what is wrong with it
            return Path(u["manifest_path"])
    if broken and version == "latest":
        raise DatasetNotFoundError(ref, None, f"cannot tell the latest version: {broken[0]['problem']} "
                                              f"(fix or remove {broken[0]['ref']}, or name a version)")
    if not versions and broken:
        raise DatasetNotFoundError(ref, None, f"no readable version: {broken[0]['problem']}")
    if not versions:
        known = sorted({v["dataset_id"] for v in list_versions(home)})
        hint = f" (datasets in the store: {', '.join(known)})" if known else " (the store is empty: verifily dataset create ...)"
        raise DatasetNotFoundError(ref, None, f"dataset {dataset_id!r} not found in {store_root(home)}{hint}")
    if version == "latest":
        return Path(max(versions, key=lambda v: (v["created_at"], v["version"]))["manifest_path"])
    if version.startswith("sha256:"):
        matches = [v for v in versions if v["content_hash"].startswith(version) and len(version) >= 13]
        if len(matches) == 1:
            return Path(matches[0]["manifest_path"])
        problem = "matches several versions; give more of the hash" if matches else "no version has this content hash"
        raise DatasetNotFoundError(ref, None, problem)
    for v in versions:
        if v["version"] == version:
            return Path(v["manifest_path"])
    raise DatasetNotFoundError(ref, None, f"version {version!r} not found (versions: {', '.join(v['version'] for v in versions)})")


def resolve(ref: str, home: Optional[Path] = None, validate_rows: bool = True,
            expected_task: Optional[str] = None) -> DatasetVersion:
    """Resolve a reference and load its manifest, verifying hashes (and rows unless told not to)."""
    return load_manifest(resolve_manifest_path(ref, home), validate_rows=validate_rows, expected_task=expected_task)


# The last DatasetVersion load_for_config validated in this process, by what was asked for: preflight validates
# every row, then the validate, tokenize and hard-examples stages ask for the same version in the same process.
_VALIDATED: dict = {}


def load_for_config(dataset_version: Optional[str], data_paths, task: str, home: Optional[Path] = None) -> DatasetVersion:
    """The DatasetVersion a config names, by reference or by ``data_paths``, checked against its task.

    Its rows are validated once per process: asked again for the same files, it hashes them and, when their bytes
    (and the manifest) are unchanged, returns the version it validated."""
    request = (dataset_version, repr(data_paths), task, str(home or verifily_home()), os.getcwd())
    if request in _VALIDATED:
        dv, stamp = _VALIDATED[request]
        if _unchanged(dv, stamp, dataset_version, data_paths, task, home):
            return dv
    dv = _load_for_config(dataset_version, data_paths, task, home)
    _VALIDATED.clear()
    _VALIDATED[request] = (dv, _manifest_stamp(dv.manifest_path))
    return dv


def _manifest_stamp(manifest_path: Optional[str]) -> Optional[tuple]:
    if manifest_path is None:
        return None
    stat = os.stat(manifest_path)
    return stat.st_mtime_ns, stat.st_size


def _unchanged(dv: DatasetVersion, stamp: Optional[tuple], dataset_version: Optional[str], data_paths, task: str,
               home: Optional[Path]) -> bool:
    """The files ``dv`` was validated from still hold the bytes it hashed, under the same manifest."""
    try:
        now = dataset_fingerprint(dataset_version, data_paths, task, home)  # hashes the bytes, parses no row
        return ((now["data_hash"], now["manifest_path"]) == (dv.content_hash, dv.manifest_path)
                and _manifest_stamp(dv.manifest_path) == stamp)
    except (VerifilyError, OSError):
        return False  # loading it again reports what is wrong now


def _load_for_config(dataset_version: Optional[str], data_paths, task: str, home: Optional[Path]) -> DatasetVersion:
    if dataset_version:
        dv = resolve(dataset_version, home, expected_task=task)
    else:
        data_paths = mapped_data_paths(data_paths, task, home)  # data_paths.columns: the rows as the tool names them
        dv = dataset_from_paths(task, data_paths.train, data_paths.val, data_paths.test)
    if dv.task != task:
        raise DataError(dv.manifest_path or dv.data_path, "task",
                        f"the dataset is for task {dv.task!r} but the config says task: {task!r}")
    return dv


def dataset_fingerprint(dataset_version: Optional[str], data_paths, task: str, home: Optional[Path] = None) -> dict:
    """The dataset's identity without parsing rows: every file's bytes hashed, manifest hashes checked."""
    if dataset_version:
        dv = load_manifest(resolve_manifest_path(dataset_version, home), validate_rows=False)
        if dv.task != task:
            raise DataError(dv.manifest_path, "task", f"the dataset is for task {dv.task!r} but the config says task: {task!r}")
        return {"data_hash": dv.content_hash, "ref": dv.ref, "manifest_path": dv.manifest_path, "data_path": dv.data_path}
    data_paths = mapped_data_paths(data_paths, task, home)
    files = dataset_files_from_paths(data_paths.train, data_paths.val, data_paths.test)
    content = dataset_content_hash([p for _, _, p in files], [rel for _, rel, _ in files])
    return {"data_hash": content, "ref": f"local@{content}", "manifest_path": None,
            "data_path": str(Path(data_paths.train).resolve().parent)}
