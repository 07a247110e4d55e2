"""The embedded default job: a tiny model built offline plus the shipped example dataset, trained end to end."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import yaml

from verifily_train.cli.train import replay_identical_run, run_train
from verifily_train.config import load_config
from verifily_train.dataset import create_version, resolve
from verifily_train.errors import DatasetNotFoundError
from verifily_train.fixtures.models import build_model, pretrain_causal_lm
from verifily_train.fsio import verifily_home
from verifily_train.model.registry import resolve_alias
from verifily_train.quiet import quiet_libraries

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"  # verifily_train/examples (package data)
DEMO_MODELS = {"sft": "llama", "classification": "bert"}  # tiny models built offline (--tiny)
EMBEDDED_DEMO = {"sft": "smollm2", "classification": "minilm"}  # real pretrained models from PyPI packages


def ensure_demo_model(kind: str, home: Path) -> Path:
    """Build ``tiny-<kind>`` (hidden 64, 2 layers) once under ``$VERIFILY_HOME/models``."""
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


def _training(task: str, tiny: bool) -> dict:
    if tiny:
        return {"num_epochs": 6, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
                "max_seq_length": 64, "logging_steps": 5, "eval_steps": 20, "save_steps": 40, "warmup_ratio": 0.05}
    if task == "sft":  # SmolLM2-135M on 2 CPU cores: two short epochs fit in a few minutes
        return {"num_epochs": 2, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                "max_seq_length": 96, "logging_steps": 5, "eval_steps": 1000, "save_steps": 20, "warmup_ratio": 0.05}
    return {"num_epochs": 3, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 2e-3,
            "max_seq_length": 64, "logging_steps": 5, "eval_steps": 1000, "save_steps": 20, "warmup_ratio": 0.05}


def prepare_demo(task: str = "sft", home: Optional[Path] = None, tiny: bool = False) -> Path:
    """Write the demo's train.yaml (model and dataset prepared) and return its path.

    By default the demo fine-tunes the embedded pretrained model (SmolLM2-135M-Instruct for SFT,
    all-MiniLM-L6-v2 for classification); ``tiny`` uses a small model built offline instead.
    """
    home = home or verifily_home()
    if tiny:
        model = str(ensure_demo_model(DEMO_MODELS[task], home))
    else:
        resolve_alias(EMBEDDED_DEMO[task])  # fails early, with the install command, when not installed
        model = EMBEDDED_DEMO[task]
    ref = ensure_demo_dataset(task, home)
    tiny_llama_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = {
        "task": task,
        "base_model": model,
        "dataset_version": ref,
        "training": _training(task, tiny),
        "lora": {"r": 16, "alpha": 32, "target_modules": tiny_llama_targets if (tiny and task == "sft") else "auto"},
        # the example outputs are at most a few words: 16 new tokens bound the generation (and the baseline's)
        "eval": {"slice_by_tags": ["source", "difficulty"], "hard_examples": 20, "max_new_tokens": 16},
        # under $VERIFILY_HOME, never the working folder: the demo writes nothing into a checkout
        "output": {"dir": str(home / "runs")},
    }
    name = f"train-{task}{'-tiny' if tiny else ''}.yaml"
    path = home / "demo" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by `verifily demo`: the embedded default job.\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def cmd_demo(args) -> int:
    """``verifily demo``: prepare the demo's train.yaml, then replay or train it as ``verifily train`` would."""
    quiet_libraries()  # before the tiny model's build imports transformers
    path = prepare_demo(args.task, tiny=args.tiny)
    print(f"demo config: {path}")
    cfg = load_config(path, args.overrides)
    if replay_identical_run(cfg):  # the demo ran before with these exact inputs
        return 0
    return run_train(cfg)
