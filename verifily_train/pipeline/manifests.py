"""Typed views of the JSON manifests stages hand each other (the manifests stay plain JSON on disk)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from verifily_train.config.schema import TrainConfig
from verifily_train.model.device import DevicePlan
from verifily_train.model.loading import ModelSpec


def model_spec(fp: dict) -> ModelSpec:
    """The fingerprint's model as a ``ModelSpec``."""
    return ModelSpec(**fp["model"])


def device_plan(fp: dict) -> DevicePlan:
    """The fingerprint's device as a ``DevicePlan`` (it also records the GPU name and CUDA version)."""
    names = {f.name for f in fields(DevicePlan)}
    return DevicePlan(**{k: v for k, v in fp["device"].items() if k in names})


def dataset_now(fp: dict, validated: dict) -> dict:
    """The validated summary with this run's paths (a cache entry may come from a copy elsewhere)."""
    return dict(validated["dataset"], manifest_path=fp["dataset"]["manifest_path"], data_path=fp["dataset"]["data_path"])


def max_row_tokens(cfg: TrainConfig, fp: dict) -> int:
    """``training.max_seq_length``, or the model's position limit when that is smaller (in the tokenize key)."""
    limit = fp.get("max_positions")
    return min(cfg.training.max_seq_length, limit) if limit else cfg.training.max_seq_length


def read_predictions(manifest: dict):
    """An evaluate (or baseline) stage's predictions as a DataFrame."""
    import pandas as pd

    return pd.read_parquet(Path(manifest["dir"]) / manifest["predictions"])
