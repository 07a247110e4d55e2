"""Stage ``slice``: metrics per value of each ``eval.slice_by_tags`` key (and the base model's, when evaluated)."""

from __future__ import annotations

from pathlib import Path

from verifily_train.evaluation.slices import slice_metrics_by_tag
from verifily_train.fsio import atomic_write_json
from verifily_train.pipeline.contract import Sliced
from verifily_train.pipeline.stage import Stage, StageContext


def key_inputs(ctx: StageContext) -> tuple:
    cfg = ctx.cfg
    return (ctx["evaluate"].output_hash, ctx["baseline"].output_hash, ctx["tokenize"].labels,
            cfg.eval.slice_by_tags, cfg.eval.metrics, cfg.eval.bootstrap_samples, cfg.seed)


def run(ctx: StageContext, out_dir: Path, work_dir: Path) -> Sliced:
    cfg, evaluated, baseline = ctx.cfg, ctx["evaluate"], ctx["baseline"]
    if evaluated.skipped:
        result = {"stage": "slice", "slices": {}, "note": evaluated.note}
    else:
        base = None if baseline.skipped else baseline.read_predictions()
        result = slice_metrics_by_tag(cfg.task, evaluated.read_predictions(), ctx["tokenize"].labels,
                                      cfg.eval.slice_by_tags, evaluated.metrics, baseline=base,
                                      bootstrap_samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
    atomic_write_json(out_dir / "slices.json", result)
    return Sliced.from_json(dict(result, file="slices.json"))


STAGE = Stage("slice", "slice-by-tags", "slice/1", __name__, key_inputs, run, Sliced,
              needs=("tokenize", "evaluate", "baseline"), retries="eval",
              description="Metrics per tag value, with the base model's beside them.")
