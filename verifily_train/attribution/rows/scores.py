"""The gradient passes: the target's projected gradient per snapshot, then every train row of one shard."""

from __future__ import annotations

from pathlib import Path

from verifily_train.attribution.rows.plan import RowAttributionPlan

TARGET_FILE = "target_gradients.safetensors"


def target_gradients(plan: RowAttributionPlan, out_dir: Path) -> dict:
    """Write the projected mean target gradient of every snapshot to ``out_dir``; returns a small JSON manifest

    (``{"step": "target", "file": ..., "snapshots": [...], "target_rows": n, "seconds": s}``)."""
    raise NotImplementedError


def score_shard(plan: RowAttributionPlan, target_manifest: dict, shard_index: int, shard_count: int,
                out_dir: Path, target_dir: Path = None) -> dict:
    """Score the train rows of shard ``shard_index`` of ``shard_count`` (contiguous blocks of the train split,
    in file order) into ``out_dir/shard-<i>-of-<n>.parquet``; returns a small JSON manifest.

    ``target_dir``: where ``target_gradients`` wrote its file (default: ``target_manifest["dir"]``).
    """
    raise NotImplementedError
