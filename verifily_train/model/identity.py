"""Identities of the things a stage reads: model weights, tokenizer files, and the stage's own code.

Model folders are hashed by their bytes once and memoised by (path, size, mtime) of every file, so a
re-run does not re-read gigabytes; a Hub model is identified by its resolved commit. The tool's own
identity (version, a digest of its sources) and the accelerator's (GPU name, CUDA version) enter the
reproducibility hash (``artifacts/env.py``), not the stage keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Iterable, Optional

from verifily_train.fsio import atomic_write_json
from verifily_train.hashing import sha256_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                   "chat_template.jinja", "chat_template.json")


def _stat_signature(files: Iterable[Path], root: Path) -> str:
    parts = []
    for p in files:
        st = p.stat()
        parts.append(f"{p.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _hash_files(files: Iterable[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n".encode())
    return digest.hexdigest()


def folder_identity(folder: Path, memo_path: Optional[Path] = None, only: Optional[Iterable[str]] = None) -> str:
    """SHA-256 over a folder's files (relative names and bytes), memoised by their sizes and mtimes."""
    folder = folder.resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                            p.relative_to(folder).parts))
    if only is not None:
        names = set(only)
        files = [p for p in files if p.name in names]
    memo_key = f"{folder}|{','.join(sorted(only)) if only is not None else '*'}"
    return _memoised(memo_path, memo_key, _stat_signature(files, folder), lambda: _hash_files(files, folder))


def _memoised(memo_path: Optional[Path], key: str, signature: str, compute) -> str:
    """``compute()`` unless the memo file holds a value for ``key`` with the same stat ``signature``."""
    memo: Dict[str, dict] = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            memo = {}
    cached = memo.get(key)
    if cached and cached.get("signature") == signature:
        return cached["sha256"]
    value = compute()
    if memo_path is not None:
        memo[key] = {"signature": signature, "sha256": value}
        try:
            atomic_write_json(memo_path, memo)
        except OSError:
            pass  # the memo is an optimisation; failing to write it changes nothing
    return value


def file_identity(path: Path, memo_path: Optional[Path] = None) -> str:
    """SHA-256 of one file's bytes, memoised by its size and mtime."""
    path = path.resolve()
    st = path.stat()
    return _memoised(memo_path, f"file|{path}", f"{st.st_size}:{st.st_mtime_ns}", lambda: sha256_file(path))


def model_identity(source: str, is_local: bool, memo_path: Optional[Path] = None) -> str:
    """``sha256:<bytes of the model folder>`` for a local model, ``hub:<repo>@<commit>`` for a Hub model."""
    if is_local:
        return "sha256:" + folder_identity(Path(source), memo_path)
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(source, local_files_only=True))
        return f"hub:{source}@{snapshot.name}"
    except Exception:  # not in the local HF cache: ask the Hub for the current commit
        from huggingface_hub import HfApi

        return f"hub:{source}@{HfApi().model_info(source).sha}"


def tokenizer_identity(source: str, is_local: bool, memo_path: Optional[Path] = None) -> str:
    """Hash of the tokenizer's files only: a weights-only change does not re-tokenize."""
    if is_local:
        return folder_identity(Path(source), memo_path, only=TOKENIZER_FILES)
    return model_identity(source, is_local, memo_path)


def chat_template_identity(source: str, is_local: bool) -> Optional[str]:
    """SHA-256 of every chat template a local tokenizer folder holds (None without one), read from its files.

    Part of the tokenize key by itself, so a changed template re-tokenizes whatever else the folder holds;
    a Hub model's template is covered by its commit (``tokenizer_identity``).
    """
    if not is_local:
        return None
    folder = Path(source)
    texts = []
    for name in ("chat_template.jinja", "chat_template.json"):
        if (folder / name).is_file():
            texts.append(f"{name}\0" + (folder / name).read_text(encoding="utf-8"))
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        texts.extend(f"{p.name}\0" + p.read_text(encoding="utf-8") for p in sorted(extra.glob("*.jinja")))
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            embedded = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except ValueError:
            embedded = None
        if embedded:
            texts.append("tokenizer_config.json\0" + json.dumps(embedded, sort_keys=True))
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest() if texts else None
