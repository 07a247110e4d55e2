"""The pipeline's stages as plain library functions (``tasks/`` wraps each one as a Prefect task).

Each stage reads the config section it needs plus the small JSON manifests of earlier stages, writes
files into its own folder, and returns a JSON manifest naming them. Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from verifily_train.config import config_hash, config_to_dict, config_to_yaml
from verifily_train.config.schema import TrainConfig
from verifily_train.dataset.manifest import check_slice_tags
from verifily_train.dataset.store import load_for_config
from verifily_train.errors import DataError, EnvironmentProblem
from verifily_train.fsio import atomic_write_json

VALIDATE_VERSION = "validate/1"


def _spec(validated: dict):
    from verifily_train.training.models import ModelSpec

    return ModelSpec(**validated["model"])


def _plan(validated: dict):
    from verifily_train.training.device import DevicePlan

    return DevicePlan(**validated["device"])


def check_push_to_hub(cfg: TrainConfig) -> None:
    """A missing token or an offline Hub is reported before training, not after."""
    if not cfg.output.push_to_hub:
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise EnvironmentProblem(None, "output.push_to_hub", "HF_HUB_OFFLINE is set, so the adapter cannot be uploaded")
    from huggingface_hub import get_token

    if not get_token():
        raise EnvironmentProblem(None, "output.push_to_hub", "no HuggingFace token: run `hf auth login` or set HF_TOKEN")


def validate_stage(cfg: TrainConfig) -> dict:
    """Dataset hashes and rows, slice tags (rule 6), model kind (rule 5), device (rule 4), Hub credentials."""
    from verifily_train.training.device import resolve_device
    from verifily_train.training.models import inspect_model

    dv = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)
    if cfg.eval.enabled:
        check_slice_tags(dv, cfg.eval.slice_by_tags)
    spec = inspect_model(cfg.base_model, cfg.task, cfg.trust_remote_code)
    plan = resolve_device(cfg.compute)
    check_push_to_hub(cfg)
    return {
        "stage": "validate",
        "version": VALIDATE_VERSION,
        "dataset": dict(dv.summary(), ref=dv.ref),
        "data_hash": dv.content_hash,
        "config_hash": config_hash(cfg),
        "model": {"source": spec.source, "kind": spec.kind, "model_type": spec.model_type, "is_local": spec.is_local},
        "device": {"device": plan.device, "precision": plan.precision, "warnings": list(plan.warnings)},
    }


def tokenize_stage(cfg: TrainConfig, validated: dict, out_dir: Path) -> dict:
    """Tokenize every split with the base model's tokenizer."""
    from verifily_train.training.models import load_tokenizer
    from verifily_train.training.tokenize import tokenize_dataset

    dv = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)
    if dv.content_hash != validated["data_hash"]:
        raise DataError(dv.manifest_path or dv.data_path, None, "the dataset changed while the run was in progress")
    spec = _spec(validated)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    return tokenize_dataset(dv, spec, tok, cfg.task, cfg.prompt, cfg.training.max_seq_length, out_dir)


def train_stage(cfg: TrainConfig, validated: dict, tokenized: dict, tokenized_dir: Path, out_dir: Path) -> dict:
    """Fine-tune with LoRA (or fully) and save the adapter."""
    from verifily_train.training.models import load_tokenizer
    from verifily_train.training.trainer import train_adapter

    spec = _spec(validated)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    return train_adapter(cfg, spec, tok, tokenized, tokenized_dir, _plan(validated), out_dir)


def evaluate_stage(cfg: TrainConfig, validated: dict, tokenized: dict, tokenized_dir: Path, trained: dict,
                   train_dir: Path, out_dir: Path) -> dict:
    """Per-example scores and overall metrics on the evaluation split."""
    from verifily_train.evaluation.predict import predict_split
    from verifily_train.training.models import load_tokenizer

    spec = _spec(validated)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    manifest = predict_split(cfg, spec, tok, tokenized, tokenized_dir, trained, train_dir, _plan(validated), out_dir)
    atomic_write_json(out_dir / "metrics.json", manifest["metrics"])
    return manifest


def _predictions(evaluated: dict, eval_dir: Path):
    import pandas as pd

    return pd.read_parquet(eval_dir / evaluated["predictions"])


def slice_stage(cfg: TrainConfig, tokenized: dict, evaluated: dict, eval_dir: Path, out_dir: Path) -> dict:
    """Metrics per value of each ``eval.slice_by_tags`` key."""
    from verifily_train.evaluation.slices import SLICE_VERSION, slice_metrics_by_tag

    out_dir.mkdir(parents=True, exist_ok=True)
    if evaluated["skipped"]:
        result = {"stage": "slice", "version": SLICE_VERSION, "slices": {}, "note": evaluated["note"]}
    else:
        result = slice_metrics_by_tag(cfg.task, _predictions(evaluated, eval_dir), tokenized["labels"],
                                      cfg.eval.slice_by_tags, evaluated["metrics"])
    atomic_write_json(out_dir / "slices.json", result)
    return dict(result, file="slices.json")


def hard_examples_stage(cfg: TrainConfig, evaluated: dict, eval_dir: Path, out_dir: Path) -> dict:
    """The ``eval.hard_examples`` worst examples, with their tags."""
    from verifily_train.evaluation.hard import HARD_VERSION, mine_hard_examples

    out_dir.mkdir(parents=True, exist_ok=True)
    if evaluated["skipped"]:
        result = {"stage": "hard_examples", "version": HARD_VERSION, "examples": [], "headline": None}
    else:
        result = mine_hard_examples(cfg.task, _predictions(evaluated, eval_dir), cfg.eval.hard_examples,
                                    cfg.eval.slice_by_tags)
    with open(out_dir / "hard_examples.jsonl", "w", encoding="utf-8") as handle:
        for example in result["examples"]:
            handle.write(json.dumps(example, sort_keys=True, ensure_ascii=False) + "\n")
    return {"stage": "hard_examples", "version": result["version"], "file": "hard_examples.jsonl",
            "count": len(result["examples"]), "headline": result["headline"]}


def write_artifact_stage(cfg: TrainConfig, run_id: str, started_at: str, started_clock: float, validated: dict,
                         tokenized: dict, trained: dict, train_dir: Path, evaluated: dict, eval_dir: Path,
                         sliced: dict, slice_dir: Path, hard: dict, hard_dir: Path, runs_dir: Path) -> dict:
    """Assemble ``runs/<run_id>/`` in a staging folder, checksum it, rename it into place, make it read-only."""
    import time

    from verifily_train.artifacts.env import describe_environment, env_hash
    from verifily_train.artifacts.run import publish_run, reproducibility_hash, staging_dir, utc_now

    runs_dir.mkdir(parents=True, exist_ok=True)
    stage = staging_dir(runs_dir, run_id)
    shutil.copytree(train_dir / trained["adapter_dir"], stage / trained["adapter_dir"])
    if trained.get("merged_dir"):
        shutil.copytree(train_dir / trained["merged_dir"], stage / "model")
    shutil.copyfile(train_dir / trained["log"], stage / "trainer_log.jsonl")
    if not evaluated["skipped"]:
        shutil.copyfile(eval_dir / evaluated["predictions"], stage / "predictions.parquet")
    shutil.copyfile(slice_dir / sliced["file"], stage / "slices.json")
    shutil.copyfile(hard_dir / hard["file"], stage / "hard_examples.jsonl")
    (stage / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    env = describe_environment(trained["device"], trained["precision"], trained["threads"])
    atomic_write_json(stage / "env.json", env)
    e_hash = env_hash(env)
    metrics = dict(evaluated["metrics"])
    metrics.update(train_loss=trained["train_loss"], train_steps=trained["global_step"],
                   train_tokens=trained["train_tokens"], train_tokens_per_second=trained["tokens_per_second"],
                   truncated_rows=tokenized["truncated_rows"])
    atomic_write_json(stage / "metrics.json", {
        "eval": evaluated["metrics"], "eval_split": evaluated["split"], "eval_note": evaluated["note"],
        "train": {k: trained[k] for k in ("train_loss", "global_step", "epochs", "train_tokens", "train_seconds",
                                          "tokens_per_second", "trainable_params", "total_params")},
        "truncated_rows": tokenized["truncated_rows"],
        "truncated_by_split": {s: v["truncated"] for s, v in tokenized["splits"].items()},
    })
    c_hash = validated["config_hash"]
    record = {
        "schema_version": 1,
        "run_id": run_id,
        "status": "completed",
        "job": job_record(cfg, run_id, started_at, validated, trained["device"]),
        "started_at": started_at,
        "completed_at": utc_now(),
        "duration_seconds": round(time.time() - started_clock, 3),
        "metrics": metrics,
        "artifact_path": str((runs_dir / run_id).resolve()),
        "config_hash": c_hash,
        "data_hash": validated["data_hash"],
        "env_hash": e_hash,
        "reproducibility_hash": reproducibility_hash(c_hash, validated["data_hash"], e_hash),
        "precision": trained["precision"],
        "evaluation": {"split": evaluated["split"], "skipped": evaluated["skipped"], "note": evaluated["note"]},
        "hard_examples_headline": hard["headline"],
        "warnings": validated["device"]["warnings"],
    }
    atomic_write_json(stage / "run.json", record)
    final = publish_run(stage, runs_dir / run_id)
    return {"stage": "write_artifact", "run_id": run_id, "path": str(final), "record": record}


def job_record(cfg: TrainConfig, run_id: str, created_at: str, validated: Optional[dict], device: Optional[str]) -> dict:
    """The TrainJob of spec §7.2, as recorded in run.json."""
    return {
        "job_id": run_id.replace("run_", "job_", 1),
        "dataset_version": validated["dataset"] if validated else {"ref": cfg.dataset_version or "data_paths"},
        "base_model": cfg.base_model,
        "task": cfg.task,
        "config": config_to_dict(cfg),
        "compute_mode": cfg.compute.mode,
        "device": device or cfg.compute.device,
        "created_at": created_at,
        "config_hash": config_hash(cfg),
    }


def push_adapter(cfg: TrainConfig, run_path: Path) -> str:
    """Upload the run's adapter folder to ``output.hub_model_id`` (only when push_to_hub is on)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(cfg.output.hub_model_id, exist_ok=True, private=True)
    api.upload_folder(repo_id=cfg.output.hub_model_id, folder_path=str(run_path / "adapter"))
    return f"https://huggingface.co/{cfg.output.hub_model_id}"
