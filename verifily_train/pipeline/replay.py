"""Replay: an identical re-run answered from the stage cache, without loading a model or running a flow.

When the ``train`` flow completes with the cache on, it records which stage entries it used under a
*replay key*: the SHA-256 of every input any stage key reads (the whole resolved config, the data's
bytes, the model's and tokenizer's identities, the gold set's bytes, library versions, each stage's code
version) plus what decides the device and precision (the torch build, visible GPUs, the CPU's bf16
flags, device environment variables). ``verifily train`` with the same inputs finds the record, verifies
every entry against its checksums, and writes a new Run from them, as the flow's ``write-artifact``
would: no torch, transformers or Prefect import, and no Prefect flow run. A missing or changed entry, a
different input, ``--refresh``, ``--no-cache`` or ``--flow`` and the run goes through the flow as usual.

Only the model's kind and the device plan come from the record rather than being re-derived: both are
functions of inputs in the key (the model's config bytes and the transformers version; the torch build
and the machine's devices), so a changed input is a different key, never a stale answer.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from verifily_train.artifacts.env import numeric_env
from verifily_train.config.hashing import config_to_dict
from verifily_train.config.schema import TrainConfig
from verifily_train.dataset.store import dataset_fingerprint
from verifily_train.fsio import atomic_write_json
from verifily_train.hashing import content_hash, sha256_file
from verifily_train.model.identity import file_identity, model_identity, tokenizer_identity
from verifily_train.model.registry import is_gguf, resolve_alias
from verifily_train.pipeline.cache import lookup
from verifily_train.pipeline.contract import GGUF_PREFIX, Fingerprint, StageOutput, gguf_identity
from verifily_train.pipeline.stage import Stage, code_versions

VERSION = "replay/1"
FOLDER = "replay"
# environment variables that change which device torch sees or how many ranks a run uses
DEVICE_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
              "PYTORCH_ENABLE_MPS_FALLBACK", "WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class Replayed:
    """A recorded run's inputs read again now, and its stage outputs from their verified entries."""

    fingerprint: Fingerprint
    outputs: Dict[str, StageOutput]


def device_signature() -> dict:
    """What ``training/device.py`` decides the device, precision and ranks from, read without importing torch."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    flags: List[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = sorted(f for f in line.split(":", 1)[1].split() if "bf16" in f or f.startswith("amx"))
                    break
    except OSError:
        pass
    devices = sorted(glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/kfd") + glob.glob("/dev/dxg"))
    return {"platform": sys.platform, "machine": platform.machine(), "mac": platform.mac_ver()[0],
            "torch": torch_version, "cpu_count": os.cpu_count(), "cpu_flags": flags, "devices": devices,
            "env": {name: os.environ.get(name) for name in DEVICE_ENV}}


def replay_key(cfg: TrainConfig, stages: Sequence[Stage], data_hash: str, model: str, tokenizer: Optional[str],
               libraries: dict) -> str:
    """Every input of every stage key, the whole config and the device's determinants, in one hash."""
    gold = sha256_file(cfg.eval.gold_set) if cfg.eval.gold_set and Path(cfg.eval.gold_set).is_file() else None
    return content_hash(VERSION, code_versions(stages), config_to_dict(cfg), data_hash, model, tokenizer, gold,
                        libraries, device_signature())


def _record_path(root: Path, key: str) -> Path:
    return root / FOLDER / f"{key}.json"


def remember(cfg: TrainConfig, fp: Fingerprint, outputs: Dict[str, StageOutput], root: Path,
             stages: Sequence[Stage]) -> Optional[Path]:
    """After a completed run (cache on): record the entries it used under its replay key."""
    names = [stage.name for stage in stages]
    if any(name not in outputs or not outputs[name].key for name in names):
        return None
    key = replay_key(cfg, stages, fp.data_hash, fp.model_identity, None if fp.is_gguf else fp.tokenizer_identity,
                     fp.numeric_env)
    record = {"version": VERSION, "key": key, "model": fp.model, "tokenizer_identity": fp.tokenizer_identity,
              "device": fp.device, "stages": {name: outputs[name].key for name in names}}
    path = _record_path(root, key)
    try:
        atomic_write_json(path, record)
    except OSError:
        return None  # an optimisation: a record that cannot be written only means the next run is a flow run
    return path


def _fresh_identities(cfg: TrainConfig, root: Path) -> Optional[dict]:
    """The key's inputs read again now (data bytes, model and tokenizer identities), without torch or transformers."""
    memo = root / "model-identities.json"
    base = resolve_alias(cfg.base_model)
    path = Path(os.path.expanduser(base))
    if is_gguf(base):
        if not path.is_file():
            return None
        model, tokenizer = gguf_identity(file_identity(path, memo)), None
    else:
        is_local = path.exists()
        source = str(path.resolve()) if is_local else base
        model, tokenizer = model_identity(source, is_local, memo), tokenizer_identity(source, is_local, memo)
    dataset = dataset_fingerprint(cfg.dataset_version, cfg.data_paths, cfg.task)
    return {"dataset": dataset, "data_hash": dataset["data_hash"], "model_identity": model,
            "tokenizer_identity": tokenizer, "numeric_env": numeric_env()}


def find(cfg: TrainConfig, root: Path, stages: Sequence[Stage]) -> Optional[Replayed]:
    """The recorded run for exactly these inputs, with every stage entry verified; None when anything differs."""
    folder = root / FOLDER
    if not folder.is_dir() or not any(folder.iterdir()):
        return None  # nothing recorded yet: skip hashing the inputs
    try:
        fresh = _fresh_identities(cfg, root)
    except Exception:  # an input that cannot be read now is the flow's to report, with its own message
        return None
    if fresh is None:
        return None
    key = replay_key(cfg, stages, fresh["data_hash"], fresh["model_identity"], fresh["tokenizer_identity"],
                     fresh["numeric_env"])
    try:
        record = json.loads(_record_path(root, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("version") != VERSION or record.get("key") != key:
        return None
    outputs: Dict[str, StageOutput] = {}
    for stage in stages:
        manifest = lookup(stage.name, record["stages"][stage.name], root)
        if manifest is None:
            return None
        outputs[stage.name] = stage.read(manifest)
    gguf = str(fresh["model_identity"]).startswith(GGUF_PREFIX)  # converted by the run that recorded it
    fp = Fingerprint.of(cfg, fresh["dataset"], model=record["model"], model_identity=fresh["model_identity"],
                        tokenizer_identity=record["tokenizer_identity"], device=record["device"],
                        numeric_env=fresh["numeric_env"], gguf_conversion="reused" if gguf else None)
    return Replayed(fp, outputs)
