"""Stage ``validate``: every row against the schemas, labels across splits, and slice tags (spec §8 rule 6)."""

from __future__ import annotations

from pathlib import Path

from verifily_train.dataset.manifest import check_slice_tags
from verifily_train.dataset.store import load_for_config
from verifily_train.errors import DataError
from verifily_train.fsio import atomic_write_json
from verifily_train.pipeline.contract import Validated
from verifily_train.pipeline.stage import Stage, StageContext


def key_inputs(ctx: StageContext) -> tuple:
    cfg = ctx.cfg
    return ctx.fp.data_hash, cfg.task, cfg.eval.enabled and cfg.eval.slice_by_tags


def current_version(ctx: StageContext):
    """The configured DatasetVersion, checked to be the bytes the fingerprint hashed."""
    cfg = ctx.cfg
    dv = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)
    if dv.content_hash != ctx.fp.data_hash:
        raise DataError(dv.manifest_path or dv.data_path, None, "the dataset changed while the run was in progress")
    return dv


def run(ctx: StageContext, out_dir: Path, work_dir: Path) -> Validated:
    dv = current_version(ctx)
    if ctx.cfg.eval.enabled:
        check_slice_tags(dv, ctx.cfg.eval.slice_by_tags)
    summary = dict(dv.summary(), ref=dv.ref)
    atomic_write_json(out_dir / "dataset.json", summary)
    return Validated(stage="validate", dataset=summary, data_hash=dv.content_hash)


STAGE = Stage("validate", "validate-manifest", "validate/1", __name__, key_inputs, run, Validated,
              description="Validate every row and tag of the dataset (cached by the data's content hash).")
