"""The Run record: ``runs/<run_id>/`` assembled from the stages' manifests (run.json, metrics, copies of their files)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional

from verifily_train.artifacts.env import describe_environment, env_hash
from verifily_train.artifacts.report import write_run_report
from verifily_train.artifacts.run import (REPRODUCIBILITY_VERSION, discard, integrity_root, publish_run,
                                          reproducibility_components, reproducibility_hash, staging_dir, utc_now)
from verifily_train.config import config_hash, config_to_dict, config_to_yaml
from verifily_train.config.schema import TrainConfig
from verifily_train.dataset.version import SPLITS
from verifily_train.fsio import atomic_write_json


def stage_report(manifests: Dict[str, dict]) -> Dict[str, dict]:
    """Per stage: cache hit or not, seconds, and key (what run.json and the summary show)."""
    return {name: {"cache_hit": bool(m.get("cache_hit")), "seconds": m.get("seconds"), "key": m.get("key")}
            for name, m in manifests.items()}


LAST_PUBLISHED: Optional[str] = None  # the last Run this process published (read if the orchestrator fails after it)


@dataclass(frozen=True)
class RunStart:
    """A run's id and when it started (wall clock for the record, a monotonic-ish clock for its duration)."""

    run_id: str
    started_at: str
    started_clock: float


def write_run(cfg: TrainConfig, start: RunStart, fp: dict, done: Mapping[str, dict], runs_dir: Path,
              charts_dir: Optional[Path] = None) -> dict:
    """Assemble ``runs/<run_id>/`` in a staging folder, checksum it, rename it into place, make it read-only.

    ``charts_dir`` memoises the report's rendered plots (the cache's ``charts/`` folder, when the cache is on).
    """
    global LAST_PUBLISHED
    stage = staging_dir(runs_dir, start.run_id)
    try:
        written = _assemble_run(cfg, start, fp, done, runs_dir, stage, charts_dir)
        LAST_PUBLISHED = written["path"]
        return written
    except BaseException:
        discard(stage)  # a failed write leaves no staging folder behind (a killed one is swept by the next run)
        raise


def _assemble_run(cfg: TrainConfig, start: RunStart, fp: dict, done: Mapping[str, dict], runs_dir: Path,
                  stage: Path, charts_dir: Optional[Path]) -> dict:
    run_id, started_at, started_clock = start.run_id, start.started_at, start.started_clock
    validated, tokenized, trained, evaluated = done["validate"], done["tokenize"], done["train"], done["evaluate"]
    baseline, sliced, hard = done["baseline"], done["slice"], done["hard_examples"]
    train_dir, eval_dir = Path(trained["dir"]), Path(evaluated["dir"])
    shutil.copytree(train_dir / trained["adapter_dir"], stage / trained["adapter_dir"])
    if trained.get("merged_dir"):
        shutil.copytree(train_dir / trained["merged_dir"], stage / "model")
    shutil.copyfile(train_dir / trained["log"], stage / "trainer_log.jsonl")
    if not evaluated["skipped"]:
        shutil.copyfile(eval_dir / evaluated["predictions"], stage / "predictions.parquet")
    shutil.copyfile(Path(sliced["dir"]) / sliced["file"], stage / "slices.json")
    shutil.copyfile(Path(hard["dir"]) / hard["file"], stage / "hard_examples.jsonl")
    _write_data_rows(Path(tokenized["dir"]), tokenized, stage / "data_rows.parquet")
    (stage / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    env = describe_environment(trained["device"], trained["precision"], trained["threads"])
    atomic_write_json(stage / "env.json", env)
    e_hash = env_hash(env)
    metrics = dict(evaluated["metrics"])
    metrics.update(train_loss=trained["train_loss"], train_steps=trained["global_step"],
                   train_tokens=trained["train_tokens"], train_tokens_per_second=trained["tokens_per_second"],
                   truncated_rows=tokenized["truncated_rows"])
    for name, value in baseline.get("metrics", {}).items():
        if name in ("loss", "perplexity"):
            metrics[f"baseline_{name}"] = value
    atomic_write_json(stage / "metrics.json", {
        "eval": evaluated["metrics"], "eval_split": evaluated["split"], "eval_note": evaluated["note"],
        "eval_ci95": sliced.get("overall", {}).get("ci95", {}),
        "bootstrap": sliced.get("bootstrap"),
        "classification_report": evaluated.get("classification_report"),
        "format": evaluated.get("format"),
        "hard_example_lift": hard.get("lift", {}),
        "baseline": baseline.get("metrics", {}), "baseline_note": baseline.get("note"),
        "train": {k: trained[k] for k in ("train_loss", "global_step", "epochs", "train_tokens", "train_seconds",
                                          "tokens_per_second", "trainable_params", "total_params",
                                          "resumed_from_step")},
        "num_processes": trained.get("num_processes", 1),
        "truncated_rows": tokenized["truncated_rows"],
        "truncated_by_split": {s: v["truncated"] for s, v in tokenized["splits"].items()},
        "answer_cut_by_split": {s: v.get("answer_cut", 0) for s, v in tokenized["splits"].items()},
        "dropped_by_split": {s: v.get("dropped", 0) for s, v in tokenized["splits"].items()},
    })
    stages = stage_report(done)
    c_hash = fp["config_hash"]
    dataset = dict(validated["dataset"], manifest_path=fp["dataset"]["manifest_path"],
                   data_path=fp["dataset"]["data_path"])
    components = reproducibility_components(
        cfg, data_hash=fp["data_hash"], model_identity=fp["model_identity"],
        tokenizer_identity=fp["tokenizer_identity"], env_hash=e_hash, device=trained["device"],
        precision=trained["precision"], gpu_name=fp["device"].get("gpu_name"),
        cuda_version=fp["device"].get("cuda_version"))  # a replay reads both from its record: no torch import
    r_hash = reproducibility_hash(components)
    record = {
        "schema_version": 1,
        "run_id": run_id,
        "status": "completed",
        "job": job_record(cfg, run_id, started_at, dataset, trained["device"]),
        "started_at": started_at,
        "completed_at": utc_now(),
        "duration_seconds": round(time.time() - started_clock, 3),
        "metrics": metrics,
        "artifact_path": str((runs_dir / run_id).resolve()),
        "config_hash": c_hash,
        "data_hash": fp["data_hash"],
        "env_hash": e_hash,
        "reproducibility_hash": r_hash,
        "reproducibility": {"hash": r_hash, "version": REPRODUCIBILITY_VERSION, "components": components},
        "model_identity": fp["model_identity"],
        "model_source": fp["model"]["source"],
        "gguf_conversion": fp["gguf_conversion"],
        "precision": trained["precision"],
        "quantization": cfg.lora.quantization if cfg.lora.enabled else "none",
        "baseline_quantization": None if baseline.get("skipped", True) else baseline.get("quantization", "none"),
        "evaluation": {"split": evaluated["split"], "skipped": evaluated["skipped"], "note": evaluated["note"]},
        "hard_examples_headline": hard["headline"],
        "stages": stages,
        "prompt": tokenized.get("prompt"),  # the rendering: format, chat template hash, an example row
        "render_check": tokenized.get("render_check"),
        "warnings": fp["device"]["warnings"] + tokenized.get("warnings", []),
    }
    atomic_write_json(stage / "run.json", record)
    write_run_report(stage, charts_dir)
    final = publish_run(stage, runs_dir / run_id)
    return {"stage": "write_artifact", "run_id": run_id, "path": str(final), "record": record,
            "integrity_root": integrity_root(final / "checksums.sha256")}


def run_summary(written: dict, evaluated: dict, sliced: dict, hard: dict) -> dict:
    """What ``verifily train`` prints and the flow returns for a written Run."""
    return {"run_id": written["run_id"], "path": written["path"], "record": written["record"], "slices": sliced,
            "hard_examples": hard, "evaluation": evaluated.get("note"), "integrity_root": written.get("integrity_root")}


def _write_data_rows(tokenized_dir: Path, tokenized: dict, target: Path) -> None:
    """Per-row identity of every split (hash, id, tags): what ``compare`` diffs two dataset versions with."""
    import pandas as pd

    # in a fixed order: a manifest read back from the cache lists its splits sorted, a fresh one in build order
    order = {name: i for i, name in enumerate(SPLITS)}
    names = sorted(tokenized["splits"], key=lambda name: (order.get(name, len(order)), name))
    frames = [pd.read_parquet(tokenized_dir / tokenized["splits"][name]["file"],
                              columns=["split", "line", "example_id", "row_hash", "tags"]) for name in names]
    pd.concat(frames, ignore_index=True).to_parquet(target, index=False)


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
