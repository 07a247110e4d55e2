"""Load and verify manifest.json (spec §7.1), or build the same DatasetVersion from plain JSONL paths."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from verifily_train.config.schema import TASKS
from verifily_train.dataset.rows import (CONVERSATION_SCHEMA, DEFAULT_ROW_SCHEMA, SFT_CONVERSATION, SFT_FORMAT_FIELDS,
                                         SFT_PROMPT_COMPLETION, SFT_TEXT, iter_jsonl, label_of, sft_format, validate_row)
from verifily_train.dataset.version import SPLITS, DataFile, DatasetVersion
from verifily_train import jsonsafe
from verifily_train.errors import DataError, ManifestError
from verifily_train.hashing import dataset_content_hash, sha256_file


@dataclass
class FileScan:
    """What one pass over a JSONL file learns: row count, tag values, labels and where each first appears."""

    num_rows: int = 0
    tag_values: Dict[str, Set[str]] = field(default_factory=dict)
    labels: Dict[str, int] = field(default_factory=dict)  # label -> first line number
    tagless_rows: int = 0
    conversations: int = 0  # SFT rows in the conversational (messages) format
    formats: Dict[str, int] = field(default_factory=dict)  # SFT rows per format (rows.SFT_FORMAT_FIELDS)


def scan_file(
    path: Path,
    display: str,
    task: str,
    row_schema: Dict[str, List[str]],
    tag_schema: Dict[str, dict],
) -> FileScan:
    """Validate every row of a file and collect its statistics."""
    scan = FileScan()
    for lineno, row in iter_jsonl(path, display):
        validate_row(row, task, row_schema, tag_schema, f"{display}:{lineno}")
        scan.num_rows += 1
        tags = row.get("tags") or {}
        if not tags:
            scan.tagless_rows += 1
        for key, value in tags.items():
            scan.tag_values.setdefault(key, set()).add(str(value))
        if task == "classification":
            scan.labels.setdefault(label_of(row), lineno)
        else:
            kind = sft_format(row, "")
            scan.formats[kind] = scan.formats.get(kind, 0) + 1
            scan.conversations += kind == SFT_CONVERSATION
    return scan


def row_schema_of(task: str, scans: Sequence[FileScan]) -> Dict[str, List[str]]:
    """The manifest's row_schema: SFT rows that are all conversations say so, any other mix keeps the default."""
    schema = dict(DEFAULT_ROW_SCHEMA)
    if task == "sft" and scans and all(s.conversations == s.num_rows for s in scans):
        schema["sft"] = list(CONVERSATION_SCHEMA)
    for kind in (SFT_PROMPT_COMPLETION, SFT_TEXT):
        if task == "sft" and any(s.num_rows for s in scans) and all(s.formats.get(kind, 0) == s.num_rows for s in scans):
            schema["sft"] = list(SFT_FORMAT_FIELDS[kind])
    return schema


def check_split_labels(dv: DatasetVersion, scans: Dict[str, FileScan]) -> None:
    """A val/test label absent from train is an error naming file and line (the head can't predict it)."""
    if dv.task != "classification":
        return
    train_labels: Set[str] = set()
    for f in dv.split_files("train"):
        train_labels.update(scans[f.path].labels)
    for f in dv.files:
        if f.split == "train":
            continue
        for label, lineno in sorted(scans[f.path].labels.items(), key=lambda kv: kv[1]):
            if label not in train_labels:
                raise DataError(f"{f.abs_path}:{lineno}", "label",
                                f"label {label!r} does not occur in the train split ({', '.join(sorted(train_labels))})")


def infer_tag_schema(scans: Sequence[FileScan]) -> Dict[str, dict]:
    """Categorical schema of every tag key seen, with its sorted values."""
    values: Dict[str, Set[str]] = {}
    for scan in scans:
        for key, vals in scan.tag_values.items():
            values.setdefault(key, set()).update(vals)
    return {key: {"type": "categorical", "values": sorted(vals)} for key, vals in sorted(values.items())}


def _require(manifest: dict, path: Path, key: str, kind: type):
    if key not in manifest:
        raise ManifestError(path, key, "missing required key")
    value = manifest[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise ManifestError(path, key, f"must be a {names}, got {type(value).__name__}")
    return value


def _check_count(mapping: dict, name: str, path: Path, key: str) -> None:
    """A declared row count is an integer: ``"24"`` would fail as "says 24 but the file has 24 rows"."""
    value = mapping.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ManifestError(path, key, f"must be a non-negative integer, got {type(value).__name__} {str(value)[:40]!r}")


# a member's path: at most this many characters, and each folder or file name at most 255 bytes (the
# filesystem's own limits, which otherwise surface as an OSError while resolving it)
MAX_MEMBER_PATH = 1024


def _safe_member(root: Path, rel: str, manifest_path: Path, key: str) -> Path:
    """Resolve ``rel`` inside ``root``; absolute paths, ``..`` escapes and symlinks leading out are rejected."""
    if "\x00" in rel:
        raise ManifestError(manifest_path, key, "path holds a NUL byte")
    if len(rel) > MAX_MEMBER_PATH or any(len(part.encode("utf-8")) > 255 for part in rel.split("/")):
        raise ManifestError(manifest_path, key, f"path is too long ({len(rel):,} characters; at most "
                                                f"{MAX_MEMBER_PATH}, 255 bytes per name)")
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise ManifestError(manifest_path, key, f"path {rel!r} must be relative to the version folder")
    if any(part == ".." for part in Path(rel).parts):
        raise ManifestError(manifest_path, key, f"path {rel!r} escapes the version folder")
    candidate = root / rel
    real_root = root.resolve()
    real = candidate.resolve()
    if real != real_root and real_root not in real.parents:
        raise ManifestError(manifest_path, key, f"path {rel!r} leads outside the version folder (symlink?)")
    if not candidate.is_file():
        raise ManifestError(manifest_path, key, f"data file {rel!r} not found")
    return candidate


def load_manifest(manifest_path: os.PathLike | str, validate_rows: bool = True,
                  expected_task: Optional[str] = None) -> DatasetVersion:
    """Load a manifest written by this tool or by the Verifily platform, verifying every hash and row.

    ``expected_task``: the config's task, checked before any row is read.
    """
    path = Path(manifest_path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        manifest = jsonsafe.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(path, None, "manifest not found") from None
    except jsonsafe.BadJson as err:
        raise ManifestError(path, err.key or (f"line {err.lineno}" if err.lineno else None), err.problem) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(path, None, f"cannot read: {err}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(path, None, "must be a JSON object")

    dataset_id = _require(manifest, path, "dataset_id", str)
    version = str(_require(manifest, path, "version", (str, int)))
    task = _require(manifest, path, "task", str)
    if task not in TASKS:
        raise ManifestError(path, "task", f"must be one of {', '.join(TASKS)}; got {task!r}")
    if expected_task is not None and task != expected_task:
        raise DataError(path, "task", f"the dataset is for task {task!r} but the config says task: {expected_task!r}")
    fmt = manifest.get("format", "jsonl")
    if fmt != "jsonl":
        raise ManifestError(path, "format", f"only jsonl is supported; got {fmt!r}")
    declared_hash = _require(manifest, path, "content_hash", str)
    files = _require(manifest, path, "files", list)
    if not files:
        raise ManifestError(path, "files", "lists no data files")
    row_schema = manifest.get("row_schema") or dict(DEFAULT_ROW_SCHEMA)
    if not isinstance(row_schema, dict) or not isinstance(row_schema.get(task, []), list):
        raise ManifestError(path, "row_schema", "must map each task to a list of field names")
    if not all(isinstance(name, str) for name in row_schema.get(task, [])):
        raise ManifestError(path, f"row_schema.{task}", "must be a list of field names (strings)")
    tag_schema = manifest.get("tag_schema") or {}
    if not isinstance(tag_schema, dict) or not all(isinstance(v, dict) for v in tag_schema.values()):
        raise ManifestError(path, "tag_schema", "must map each tag key to an object like {\"type\": \"categorical\", \"values\": [...]}")
    for tag, spec in tag_schema.items():
        if "values" in spec and not isinstance(spec["values"], list):
            raise ManifestError(path, f"tag_schema.{tag}.values", f"must be a list, got {type(spec['values']).__name__}")
    _check_count(manifest, "num_rows", path, "num_rows")
    tag_keys = manifest.get("tag_keys")
    if tag_keys is not None and (not isinstance(tag_keys, list) or not all(isinstance(k, str) for k in tag_keys)):
        raise ManifestError(path, "tag_keys", "must be a list of tag key names")

    root = path.parent
    data_files: List[DataFile] = []
    seen: Set[str] = set()
    for i, entry in enumerate(files):
        key = f"files[{i}]"
        if not isinstance(entry, dict):
            raise ManifestError(path, key, "must be an object with path, split, sha256")
        rel = entry.get("path")
        if not isinstance(rel, str):
            raise ManifestError(path, f"{key}.path", "missing or not a string")
        _check_count(entry, "num_rows", path, f"{key}.num_rows")
        split = entry.get("split")
        if split not in SPLITS:
            raise ManifestError(path, f"{key}.split", f"must be one of {', '.join(SPLITS)}; got {split!r}")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not sha:
            raise ManifestError(path, f"{key}.sha256", "missing or not a string")
        if rel in seen:
            raise ManifestError(path, f"{key}.path", f"{rel!r} is listed twice")
        seen.add(rel)
        abs_path = _safe_member(root, rel, path, f"{key}.path")
        real = str(abs_path.resolve())
        if real in seen:  # ./train.jsonl, a//b or a symlink naming a file listed already: its rows would count twice
            raise ManifestError(path, f"{key}.path", f"{rel!r} is listed twice (it names the same file as another entry)")
        seen.add(real)
        actual = sha256_file(abs_path)
        if actual != sha.removeprefix("sha256:"):
            raise ManifestError(path, f"{key}.sha256", f"does not match {rel} (file changed since the manifest was written)")
        declared_rows = entry.get("num_rows")
        data_files.append(DataFile(path=rel, split=split, num_rows=int(declared_rows or 0), sha256=actual,
                                   abs_path=str(abs_path)))
    if not any(f.split == "train" for f in data_files):
        raise ManifestError(path, "files", "no file has split \"train\"")

    actual_hash = dataset_content_hash([f.abs_path for f in data_files], [f.path for f in data_files])
    if actual_hash != declared_hash:
        raise ManifestError(path, "content_hash", f"does not match the data files (expected {declared_hash}, computed {actual_hash})")

    scans: Dict[str, FileScan] = {}
    if validate_rows:
        for i, f in enumerate(data_files):
            scans[f.path] = scan = scan_file(Path(f.abs_path), f.abs_path, task, row_schema, tag_schema)
            if scan.num_rows == 0:
                raise DataError(f.abs_path, None, f"split {f.split} has no rows")
            declared = files[i].get("num_rows")
            if declared is not None and declared != scan.num_rows:
                raise ManifestError(path, f"files[{i}].num_rows", f"says {declared} but {f.path} has {scan.num_rows} rows")
            data_files[i] = DataFile(f.path, f.split, scan.num_rows, f.sha256, f.abs_path)
        total = sum(f.num_rows for f in data_files)
        declared_total = manifest.get("num_rows")
        if declared_total is not None and declared_total != total:
            raise ManifestError(path, "num_rows", f"says {declared_total} but the files hold {total} rows")
    else:
        total = int(manifest.get("num_rows") or sum(f.num_rows for f in data_files))

    if tag_keys is None:
        tag_keys = sorted(tag_schema) if tag_schema else sorted(infer_tag_schema(list(scans.values())))
    dv = DatasetVersion(
        dataset_id=dataset_id,
        version=version,
        format="jsonl",
        task=task,
        num_rows=total,
        tags=list(tag_keys),
        manifest_path=str(path.resolve()),
        data_path=str(root.resolve()),
        content_hash=actual_hash,
        created_at=str(manifest.get("created_at") or ""),
        files=tuple(data_files),
        tag_schema=tag_schema or infer_tag_schema(list(scans.values())),
        row_schema={task: list(row_schema.get(task) or DEFAULT_ROW_SCHEMA[task])},
    )
    if validate_rows:
        check_split_labels(dv, scans)
    return dv


def build_manifest(
    dataset_id: str,
    version: str,
    task: str,
    split_files: Sequence[Tuple[str, str, Path]],
    created_at: Optional[str] = None,
    sources: Optional[Dict[str, str]] = None,
) -> Tuple[dict, Dict[str, FileScan]]:
    """A spec §7.1 manifest for files already in place; ``split_files`` is (split, relative name, path).

    ``sources`` maps a relative name to the file the user gave (row errors name it, not a staging copy)."""
    scans: Dict[str, FileScan] = {}
    entries = []
    for split, rel, path in split_files:
        display = (sources or {}).get(rel, str(path))
        scan = scan_file(path, display, task, DEFAULT_ROW_SCHEMA, {})
        if scan.num_rows == 0:
            raise DataError(display, None, f"split {split} has no rows")
        scans[rel] = scan
        entries.append({"path": rel, "split": split, "num_rows": scan.num_rows, "sha256": sha256_file(path)})
    tag_schema = infer_tag_schema(list(scans.values()))
    manifest = {
        "dataset_id": dataset_id,
        "version": version,
        "format": "jsonl",
        "task": task,
        "num_rows": sum(e["num_rows"] for e in entries),
        "content_hash": dataset_content_hash([p for _, _, p in split_files], [r for _, r, _ in split_files]),
        "created_at": created_at or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tag_keys": sorted(tag_schema),
        "files": entries,
        "row_schema": row_schema_of(task, list(scans.values())),
        "tag_schema": tag_schema,
    }
    return manifest, scans


def dataset_files_from_paths(train: str, val: Optional[str] = None, test: Optional[str] = None) -> List[Tuple[str, str, Path]]:
    """(split, name, path) for ``data_paths:``; names are ``<split>.jsonl``, as in the store."""
    split_files = []
    for split, value in (("train", train), ("val", val), ("test", test)):
        if not value:
            continue
        p = Path(value)
        if not p.is_file():
            raise DataError(p, None, f"data_paths.{split}: file not found")
        split_files.append((split, f"{split}.jsonl", p))
    return split_files


def dataset_from_paths(task: str, train: str, val: Optional[str] = None, test: Optional[str] = None) -> DatasetVersion:
    """The DatasetVersion of ``data_paths:``: the same object and hashes as ``dataset create`` would give."""
    split_files = dataset_files_from_paths(train, val, test)
    manifest, scans = build_manifest("local", "", task, split_files)
    files = tuple(
        DataFile(path=e["path"], split=e["split"], num_rows=e["num_rows"], sha256=e["sha256"], abs_path=str(p.resolve()))
        for e, (_, _, p) in zip(manifest["files"], split_files)
    )
    dv = DatasetVersion(
        dataset_id="local",
        version=manifest["content_hash"],
        format="jsonl",
        task=task,
        num_rows=manifest["num_rows"],
        tags=manifest["tag_keys"],
        manifest_path=None,
        data_path=str(Path(train).resolve().parent),
        content_hash=manifest["content_hash"],
        created_at=manifest["created_at"],
        files=files,
        tag_schema=manifest["tag_schema"],
        row_schema={task: manifest["row_schema"][task]},
    )
    check_split_labels(dv, {f.path: scans[f.path] for f in files})
    return dv


def check_slice_tags(dv: DatasetVersion, slice_by_tags: Sequence[str]) -> None:
    """Spec §8 rule 6: every ``eval.slice_by_tags`` key must be a tag key of the dataset."""
    for i, key in enumerate(slice_by_tags):
        if key not in dv.tags:
            have = ", ".join(dv.tags) if dv.tags else "none (rows carry no tags)"
            raise DataError(dv.manifest_path or dv.data_path, f"eval.slice_by_tags[{i}]",
                            f"tag key {key!r} is not in the dataset (tag keys: {have}); set eval.slice_by_tags=[] to skip slicing")
