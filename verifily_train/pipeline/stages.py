"""The pipeline's stages as plain library functions (``tasks/`` wraps each one as a Prefect task).

Each stage reads the config section it needs plus the small JSON manifests of earlier stages, writes
files into its own output folder (a cache entry, see ``verifily_train.pipeline.cache``), and returns a JSON
manifest naming them. ``fingerprint_stage`` runs every time: it computes the identities the cache
keys are made of. Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional

from verifily_train.config import config_hash, config_to_dict, config_to_yaml
from verifily_train.config.schema import TrainConfig
from verifily_train.dataset.manifest import check_slice_tags
from verifily_train.dataset.store import dataset_fingerprint, load_for_config
from verifily_train.errors import DataError, EnvironmentProblem
from verifily_train.fsio import atomic_write_json


def _spec(fp: dict):
    from verifily_train.model.loading import ModelSpec

    return ModelSpec(**fp["model"])


def _plan(fp: dict):
    from dataclasses import fields

    from verifily_train.model.device import DevicePlan

    names = {f.name for f in fields(DevicePlan)}  # fp["device"] also records the GPU name and CUDA version
    return DevicePlan(**{k: v for k, v in fp["device"].items() if k in names})


def check_push_to_hub(cfg: TrainConfig) -> None:
    """A missing token or an offline Hub is reported before training, not after."""
    if not cfg.output.push_to_hub:
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise EnvironmentProblem(None, "output.push_to_hub", "HF_HUB_OFFLINE is set, so the adapter cannot be uploaded")
    from huggingface_hub import get_token

    if not get_token():
        raise EnvironmentProblem(None, "output.push_to_hub", "no HuggingFace token: run `hf auth login` or set HF_TOKEN")


def fingerprint_stage(cfg: TrainConfig, cache_dir: Path) -> dict:
    """Identities of the data (bytes), model (weights), tokenizer (files), device and config: the keys' inputs."""
    from verifily_train.errors import ModelError
    from verifily_train.artifacts.env import accelerator_identity, numeric_env
    from verifily_train.model.identity import chat_template_identity, file_identity, model_identity, tokenizer_identity
    from verifily_train.model.device import resolve_device
    from verifily_train.model.loading import inspect_model
    from verifily_train.model.registry import convert_gguf, is_gguf, resolve_alias

    dataset = dataset_fingerprint(cfg.dataset_version, cfg.data_paths, cfg.task)
    plan = resolve_device(cfg.compute)
    check_push_to_hub(cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    memo = cache_dir / "model-identities.json"
    base = resolve_alias(cfg.base_model)
    identity, conversion = None, None
    if is_gguf(base):
        gguf = Path(os.path.expanduser(base))
        if not gguf.is_file():
            raise ModelError(cfg.base_model, "base_model", "GGUF file not found")
        sha = file_identity(gguf, memo)
        identity = f"gguf:sha256:{sha}"  # the Run records the GGUF's bytes as the model identity
        folder, converted = convert_gguf(gguf, sha, cache_dir)
        base, conversion = str(folder), ("converted" if converted else "reused")
    spec = inspect_model(base, cfg.task, cfg.trust_remote_code)
    from verifily_train.model.loading import position_limit

    return {
        "stage": "fingerprint",
        "max_positions": position_limit(spec.source, cfg.trust_remote_code),  # the model's own row limit
        "dataset": dataset,
        "data_hash": dataset["data_hash"],
        "config_hash": config_hash(cfg),
        "model": {"source": spec.source, "kind": spec.kind, "model_type": spec.model_type, "is_local": spec.is_local},
        "model_identity": identity or model_identity(spec.source, spec.is_local, memo),
        "gguf_conversion": conversion,
        "tokenizer_identity": tokenizer_identity(spec.source, spec.is_local, memo),
        "chat_template_hash": chat_template_identity(spec.source, spec.is_local),  # in the tokenize key
        "device": {"device": plan.device, "precision": plan.precision, "warnings": list(plan.warnings),
                   "num_processes": plan.num_processes, **accelerator_identity(plan.device)},
        "numeric_env": numeric_env(),
    }


def validate_stage(cfg: TrainConfig, fp: dict, out_dir: Path, work_dir: Path) -> dict:
    """Every row against the schemas, labels across splits, and slice tags (spec §8 rule 6)."""
    dv = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)
    if dv.content_hash != fp["data_hash"]:
        raise DataError(dv.manifest_path or dv.data_path, None, "the dataset changed while the run was in progress")
    if cfg.eval.enabled:
        check_slice_tags(dv, cfg.eval.slice_by_tags)
    summary = dict(dv.summary(), ref=dv.ref)
    atomic_write_json(out_dir / "dataset.json", summary)
    return {"stage": "validate", "dataset": summary, "data_hash": dv.content_hash}


def _dataset_now(fp: dict, validated: dict) -> dict:
    """The validated summary with this run's paths (a cache entry may come from a copy elsewhere)."""
    return dict(validated["dataset"], manifest_path=fp["dataset"]["manifest_path"], data_path=fp["dataset"]["data_path"])


def tokenize_stage(cfg: TrainConfig, fp: dict, out_dir: Path, work_dir: Path) -> dict:
    """Tokenize every split with the base model's tokenizer."""
    from verifily_train.model.loading import load_tokenizer
    from verifily_train.model.tokenize import tokenize_dataset

    dv = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)
    if dv.content_hash != fp["data_hash"]:
        raise DataError(dv.manifest_path or dv.data_path, None, "the dataset changed while the run was in progress")
    spec = _spec(fp)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    max_len = max_row_tokens(cfg, fp)
    manifest = tokenize_dataset(dv, spec, tok, cfg.task, cfg.prompt, max_len, out_dir)
    if max_len < cfg.training.max_seq_length:  # said once, in the Run's warnings
        manifest["warnings"] = [f"the model reads at most {max_len} positions (max_position_embeddings): rows are "
                                f"cut at {max_len} tokens, not at training.max_seq_length="
                                f"{cfg.training.max_seq_length}"] + list(manifest.get("warnings") or [])
    return manifest


def max_row_tokens(cfg: TrainConfig, fp: dict) -> int:
    """``training.max_seq_length``, or the model's position limit when that is smaller (in the tokenize key)."""
    limit = fp.get("max_positions")
    return min(cfg.training.max_seq_length, limit) if limit else cfg.training.max_seq_length


def train_stage(cfg: TrainConfig, fp: dict, tokenized: dict, out_dir: Path, work_dir: Path,
                on_progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Fine-tune with LoRA (or fully) and save the adapter; checkpoints in ``work_dir`` make it resumable.

    ``on_progress(step, max_steps)`` is called as optimizer steps complete (an orchestrator's progress bar)."""
    from verifily_train.model.loading import load_tokenizer
    from verifily_train.training.trainer import train_adapter

    spec = _spec(fp)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    return train_adapter(cfg, spec, tok, tokenized, Path(tokenized["dir"]), _plan(fp), out_dir, work_dir,
                         on_progress=on_progress)


def evaluate_stage(cfg: TrainConfig, fp: dict, tokenized: dict, trained: dict, out_dir: Path, work_dir: Path) -> dict:
    """Per-example scores and overall metrics on the evaluation split."""
    from verifily_train.evaluation.predict import predict_split
    from verifily_train.model.loading import load_tokenizer

    spec = _spec(fp)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    manifest = predict_split(cfg, spec, tok, tokenized, Path(tokenized["dir"]), trained, Path(trained["dir"]),
                             _plan(fp), out_dir)
    atomic_write_json(out_dir / "metrics.json", manifest["metrics"])
    return manifest


def baseline_stage(cfg: TrainConfig, fp: dict, tokenized: dict, out_dir: Path, work_dir: Path) -> dict:
    """The untuned base model on the split (SFT), loaded as the adapter's base is: the gain is fine-tuning alone."""
    from dataclasses import replace

    from verifily_train.evaluation.baseline import baseline_load_plan, write_untrained_adapter
    from verifily_train.evaluation.predict import predict_split
    from verifily_train.model.loading import load_tokenizer

    if cfg.task != "sft" or not cfg.eval.baseline or not cfg.eval.enabled or tokenized["eval_split"] is None:
        why = ("classification heads start random, so the base model has no meaningful score"
               if cfg.task != "sft" else "eval.baseline is false or evaluation is skipped")
        return {"stage": "baseline", "skipped": True, "note": why, "split": None, "metrics": {}}
    spec = _spec(fp)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    quantization = baseline_load_plan(cfg.lora)["quantization"]
    if quantization == "none":
        manifest = predict_split(cfg, spec, tok, tokenized, Path(tokenized["dir"]), None, None, _plan(fp), out_dir)
    else:  # the trained adapter's own load path (quantized base + adapter), with an all-zero adapter
        untrained = write_untrained_adapter(cfg, spec, work_dir)
        base_cfg = replace(cfg, eval=replace(cfg.eval, gold_set=None))  # the gold set scores the tuned model only
        manifest = predict_split(base_cfg, spec, tok, tokenized, Path(tokenized["dir"]), untrained, work_dir,
                                 _plan(fp), out_dir)
    return dict(manifest, stage="baseline", quantization=quantization)


def _predictions(evaluated: dict):
    import pandas as pd

    return pd.read_parquet(Path(evaluated["dir"]) / evaluated["predictions"])


def slice_stage(cfg: TrainConfig, tokenized: dict, evaluated: dict, baseline: dict, out_dir: Path,
                work_dir: Path) -> dict:
    """Metrics per value of each ``eval.slice_by_tags`` key (and the base model's, when evaluated)."""
    from verifily_train.evaluation.slices import slice_metrics_by_tag

    if evaluated["skipped"]:
        result = {"stage": "slice", "slices": {}, "note": evaluated["note"]}
    else:
        base = None if baseline.get("skipped", True) else _predictions(baseline)
        result = slice_metrics_by_tag(cfg.task, _predictions(evaluated), tokenized["labels"],
                                      cfg.eval.slice_by_tags, evaluated["metrics"], baseline=base,
                                      bootstrap_samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
    atomic_write_json(out_dir / "slices.json", result)
    return dict(result, file="slices.json")


def hard_examples_stage(cfg: TrainConfig, evaluated: dict, out_dir: Path, work_dir: Path) -> dict:
    """The ``eval.hard_examples`` worst examples, with their tags."""
    from verifily_train.evaluation.hard import mine_hard_examples

    if evaluated["skipped"]:
        result = {"examples": [], "headline": None, "lift": {}}
    else:
        result = mine_hard_examples(cfg.task, _predictions(evaluated), cfg.eval.hard_examples, cfg.eval.slice_by_tags,
                                    q=cfg.eval.fdr_q)
    with open(out_dir / "hard_examples.jsonl", "w", encoding="utf-8") as handle:
        for example in result["examples"]:
            handle.write(json.dumps(example, sort_keys=True, ensure_ascii=False) + "\n")
    return {"stage": "hard_examples", "file": "hard_examples.jsonl", "count": len(result["examples"]),
            "headline": result["headline"], "lift": result["lift"]}


def stage_report(manifests: Dict[str, dict]) -> Dict[str, dict]:
    """Per stage: cache hit or not, seconds, and key (what run.json and the summary show)."""
    return {name: {"cache_hit": bool(m.get("cache_hit")), "seconds": m.get("seconds"), "key": m.get("key")}
            for name, m in manifests.items()}


LAST_PUBLISHED: Optional[str] = None  # the last Run this process published (read if the orchestrator fails after it)


def write_artifact_stage(cfg: TrainConfig, run_id: str, started_at: str, started_clock: float, fp: dict,
                         validated: dict, tokenized: dict, trained: dict, evaluated: dict, baseline: dict,
                         sliced: dict, hard: dict, runs_dir: Path) -> dict:
    """Assemble ``runs/<run_id>/`` in a staging folder, checksum it, rename it into place, make it read-only."""
    from verifily_train.artifacts.run import discard, staging_dir

    global LAST_PUBLISHED
    stage = staging_dir(runs_dir, run_id)
    try:
        written = _assemble_run(cfg, run_id, started_at, started_clock, fp, validated, tokenized, trained, evaluated,
                                baseline, sliced, hard, runs_dir, stage)
        LAST_PUBLISHED = written["path"]
        return written
    except BaseException:
        discard(stage)  # a failed write leaves no staging folder behind (a killed one is swept by the next run)
        raise


def _assemble_run(cfg: TrainConfig, run_id: str, started_at: str, started_clock: float, fp: dict, validated: dict,
                  tokenized: dict, trained: dict, evaluated: dict, baseline: dict, sliced: dict, hard: dict,
                  runs_dir: Path, stage: Path) -> dict:
    import time

    from verifily_train.artifacts.env import describe_environment, env_hash
    from verifily_train.artifacts.run import (REPRODUCIBILITY_VERSION, integrity_root, publish_run,
                                              reproducibility_components, reproducibility_hash, utc_now)

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
    stages = stage_report({"validate": validated, "tokenize": tokenized, "train": trained, "evaluate": evaluated,
                           "baseline": baseline, "slice": sliced, "hard_examples": hard})
    c_hash = fp["config_hash"]
    dataset = _dataset_now(fp, validated)
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
    from verifily_train.artifacts.report import write_run_report
    from verifily_train.pipeline.cache import cache_root

    write_run_report(stage, cache_root(cfg.cache.dir) / "charts" if cfg.cache.enabled else None)
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
    from verifily_train.dataset.version import SPLITS

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


def push_adapter(cfg: TrainConfig, run_path: Path) -> str:
    """Upload the run's adapter folder to ``output.hub_model_id`` (only when push_to_hub is on)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(cfg.output.hub_model_id, exist_ok=True, private=True)
    api.upload_folder(repo_id=cfg.output.hub_model_id, folder_path=str(run_path / "adapter"))
    return f"https://huggingface.co/{cfg.output.hub_model_id}"
