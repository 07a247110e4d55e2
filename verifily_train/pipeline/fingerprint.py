"""The fingerprint: identities of the data (bytes), model (weights), tokenizer (files), device and config.

It runs on every flow run (it is what the stage keys are made of) and is never cached itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from verifily_train.artifacts.env import accelerator_identity, numeric_env
from verifily_train.artifacts.hub import check_push_to_hub
from verifily_train.config.schema import TrainConfig
from verifily_train.dataset.store import dataset_fingerprint
from verifily_train.errors import ModelError
from verifily_train.model.device import resolve_device
from verifily_train.model.identity import chat_template_identity, file_identity, model_identity, tokenizer_identity
from verifily_train.model.loading import inspect_model, position_limit
from verifily_train.model.registry import convert_gguf, is_gguf, resolve_alias
from verifily_train.pipeline.contract import Fingerprint, gguf_identity


def fingerprint_stage(cfg: TrainConfig, cache_dir: Path) -> Fingerprint:
    """Every stage key's inputs, read now: a changed byte anywhere is a different key."""
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
        identity = gguf_identity(sha)  # the Run records the GGUF's bytes as the model identity
        folder, converted = convert_gguf(gguf, sha, cache_dir)
        base, conversion = str(folder), ("converted" if converted else "reused")
    spec = inspect_model(base, cfg.task, cfg.trust_remote_code)
    return Fingerprint.of(
        cfg, dataset,
        model={"source": spec.source, "kind": spec.kind, "model_type": spec.model_type, "is_local": spec.is_local},
        model_identity=identity or model_identity(spec.source, spec.is_local, memo),
        tokenizer_identity=tokenizer_identity(spec.source, spec.is_local, memo),
        device={"device": plan.device, "precision": plan.precision, "warnings": list(plan.warnings),
                "num_processes": plan.num_processes, **accelerator_identity(plan.device)},
        numeric_env=numeric_env(), gguf_conversion=conversion,
        max_positions=position_limit(spec.source, cfg.trust_remote_code),  # the model's own row limit
        chat_template_hash=chat_template_identity(spec.source, spec.is_local))  # in the tokenize key
