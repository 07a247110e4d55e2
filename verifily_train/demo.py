"""The embedded default job: a tiny model built offline plus the shipped example dataset, trained end to end."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import yaml

from verifily_train.errors import DatasetNotFoundError
from verifily_train.fsio import verifily_home

EXAMPLES = Path(__file__).resolve().parent / "examples"
DEMO_MODELS = {"sft": "llama", "classification": "bert"}


def ensure_demo_model(kind: str, home: Path) -> Path:
    """Build ``tiny-<kind>`` (hidden 64, 2 layers) once under ``$VERIFILY_HOME/models``."""
    from verifily_train.fixtures.models import build_model, pretrain_causal_lm

    final = home / "models" / f"demo-{kind}"
    if (final / "config.json").is_file():
        return final
    staging = final.parent / f".staging-{final.name}-{uuid.uuid4().hex[:6]}"
    build_model(kind, staging, hidden=64, layers=2, seed=0)
    if kind == "llama":
        pretrain_causal_lm(staging)
    try:
        os.rename(staging, final)
    except OSError:  # another process built it first
        shutil.rmtree(staging, ignore_errors=True)
    return final


def ensure_demo_dataset(task: str, home: Path) -> str:
    """``ds_demo_<task>@v1`` in the store, created from the shipped example splits."""
    from verifily_train.dataset import create_version, resolve

    ref = f"ds_demo_{task}@v1"
    try:
        resolve(ref, home, validate_rows=False)
        return ref
    except DatasetNotFoundError:
        pass
    folder = EXAMPLES / ("sft" if task == "sft" else "classification")
    create_version(f"ds_demo_{task}", "v1", task, str(folder / "train.jsonl"), str(folder / "val.jsonl"),
                   str(folder / "test.jsonl"), home=home)
    return ref


def prepare_demo(task: str = "sft", home: Optional[Path] = None) -> Path:
    """Write the demo's train.yaml (model and dataset prepared) and return its path."""
    home = home or verifily_home()
    model = ensure_demo_model(DEMO_MODELS[task], home)
    ref = ensure_demo_dataset(task, home)
    config = {
        "task": task,
        "base_model": str(model),
        "dataset_version": ref,
        "training": {"num_epochs": 6, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
                     "max_seq_length": 64, "logging_steps": 5, "eval_steps": 20, "save_steps": 40,
                     "warmup_ratio": 0.05},
        "lora": {"r": 16, "alpha": 32, "target_modules": "auto" if task == "classification" else
                 ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "eval": {"slice_by_tags": ["source", "difficulty"], "hard_examples": 20},
        "output": {"dir": "runs/"},
    }
    path = home / "demo" / f"train-{task}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by `verifily demo`: the embedded default job.\n" + yaml.safe_dump(config, sort_keys=False))
    return path
