"""The Run record: ``runs/<run_id>/`` assembled from the fragments the stages contribute (run.json, metrics, files)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from verifily_train.artifacts.env import describe_environment, env_hash
from verifily_train.artifacts.report import write_run_report
from verifily_train.artifacts.run import (REPRODUCIBILITY_VERSION, RUN_SCHEMA_VERSION, discard, integrity_root,
                                          publish_run, reproducibility_components, reproducibility_hash, staging_dir,
                                          utc_now)
from verifily_train.config import config_hash, config_to_dict, config_to_yaml
from verifily_train.config.schema import TrainConfig
from verifily_train.fsio import atomic_write_json


@dataclass(frozen=True)
class RunFragment:
    """What one stage (or the fingerprint) contributes to a Run; the Run is the merge of its stages' fragments.

    ``identity`` feeds the record's own parts: ``dataset`` (the job), ``device``/``precision``/``threads`` (env.json),
    the data, model and tokenizer identities and the GPU (the reproducibility hash).
    """

    record: Mapping[str, Any] = field(default_factory=dict)  # run.json keys
    metrics: Mapping[str, Any] = field(default_factory=dict)  # run.json's ``metrics``: the headline figures
    metrics_file: Mapping[str, Any] = field(default_factory=dict)  # metrics.json keys
    identity: Mapping[str, Any] = field(default_factory=dict)
    warnings: Tuple[str, ...] = ()
    copy: Optional[Callable[[Path], None]] = None  # writes its files into the Run's staging folder


def merged(parts: Sequence[Mapping[str, Any]], what: str) -> Dict[str, Any]:
    """One mapping from the fragments' parts; two fragments naming one key is a bug in the stage contract."""
    out: Dict[str, Any] = {}
    for part in parts:
        clash = sorted(set(out) & set(part))
        if clash:
            raise ValueError(f"two stages contribute {what} {', '.join(clash)}")
        out.update(part)
    return out


@dataclass(frozen=True)
class RunStart:
    """A run's id and when it started (wall clock for the record, a monotonic-ish clock for its duration)."""

    run_id: str
    started_at: str
    started_clock: float


def write_run_record(cfg: TrainConfig, start: RunStart, fragments: Sequence[RunFragment], runs_dir: Path,
                     charts_dir: Optional[Path] = None) -> dict:
    """Assemble ``runs/<run_id>/`` in a staging folder, checksum it, rename it into place, make it read-only.

    ``charts_dir`` memoises the report's rendered plots (the cache's ``charts/`` folder, when the cache is on).
    """
    stage = staging_dir(runs_dir, start.run_id)
    try:
        return _assemble_run(cfg, start, fragments, runs_dir, stage, charts_dir)
    except BaseException:
        discard(stage)  # a failed write leaves no staging folder behind (a killed one is swept by the next run)
        raise


def _assemble_run(cfg: TrainConfig, start: RunStart, fragments: Sequence[RunFragment], runs_dir: Path,
                  stage: Path, charts_dir: Optional[Path]) -> dict:
    run_id, started_at, started_clock = start.run_id, start.started_at, start.started_clock
    for fragment in fragments:
        if fragment.copy is not None:
            fragment.copy(stage)
    (stage / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    identity = merged([f.identity for f in fragments], "identity")
    env = describe_environment(identity["device"], identity["precision"], identity["threads"])
    atomic_write_json(stage / "env.json", env)
    e_hash = env_hash(env)
    metrics = merged([f.metrics for f in fragments], "metric")
    atomic_write_json(stage / "metrics.json", merged([f.metrics_file for f in fragments], "metrics.json key"))
    components = reproducibility_components(
        cfg, data_hash=identity["data_hash"], model_identity=identity["model_identity"],
        tokenizer_identity=identity["tokenizer_identity"], env_hash=e_hash, device=identity["device"],
        precision=identity["precision"], gpu_name=identity["gpu_name"],
        cuda_version=identity["cuda_version"])  # a replay reads both from its record: no torch import
    r_hash = reproducibility_hash(components)
    record = {
        "schema_version": RUN_SCHEMA_VERSION,
        "run_id": run_id,
        "status": "completed",
        "job": job_record(cfg, run_id, started_at, identity["dataset"], identity["device"]),
        "started_at": started_at,
        "completed_at": utc_now(),
        "duration_seconds": round(time.time() - started_clock, 3),
        "metrics": metrics,
        "artifact_path": str((runs_dir / run_id).resolve()),
        "env_hash": e_hash,
        "reproducibility_hash": r_hash,
        "reproducibility": {"hash": r_hash, "version": REPRODUCIBILITY_VERSION, "components": components},
        "quantization": cfg.lora.quantization if cfg.lora.enabled else "none",
        "warnings": [w for f in fragments for w in f.warnings],
    }
    record = merged([record] + [f.record for f in fragments], "run.json key")
    atomic_write_json(stage / "run.json", record)
    write_run_report(stage, charts_dir)
    final = publish_run(stage, runs_dir / run_id)
    return {"stage": "write_artifact", "run_id": run_id, "path": str(final), "record": record,
            "integrity_root": integrity_root(final / "checksums.sha256")}


def run_summary(written: dict, evaluated: dict, sliced: dict, hard: dict) -> dict:
    """What ``verifily train`` prints and the flow returns for a written Run."""
    return {"run_id": written["run_id"], "path": written["path"], "record": written["record"], "slices": sliced,
            "hard_examples": hard, "evaluation": evaluated.get("note"), "integrity_root": written.get("integrity_root")}


def job_record(cfg: TrainConfig, run_id: str, created_at: str, dataset: Optional[dict], device: Optional[str]) -> dict:
    """The TrainJob of spec §7.2, as recorded in run.json."""
    return {
        "job_id": run_id.replace("run_", "job_", 1),
        "dataset_version": dataset or {"ref": cfg.dataset_version or "data_paths"},
        "base_model": cfg.base_model,
        "task": cfg.task,
        "config": config_to_dict(cfg),
        "compute_mode": cfg.compute.mode,
        "device": device or cfg.compute.device,
        "created_at": created_at,
        "config_hash": config_hash(cfg),
    }
