"""Stages ``evaluate`` and ``baseline``: per-example scores of the tuned model, and of the untuned base (SFT)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from verifily_train.config.hashing import hashed_section
from verifily_train.evaluation.baseline import baseline_key_parts, baseline_load_plan, write_untrained_adapter
from verifily_train.evaluation.predict import predict_split
from verifily_train.fsio import atomic_write_json
from verifily_train.hashing import sha256_file
from verifily_train.model.loading import load_tokenizer
from verifily_train.pipeline.contract import Baseline, Evaluated
from verifily_train.pipeline.stage import Stage, StageContext


def gold_set_hash(cfg):
    """The gold set's bytes (not its path) when one is configured."""
    return sha256_file(cfg.eval.gold_set) if cfg.eval.gold_set else None


def key_inputs(ctx: StageContext) -> tuple:
    cfg, fp = ctx.cfg, ctx.fp
    return (ctx["train"].output_hash, ctx["tokenize"].output_hash, fp.model_identity, cfg.lora.quantization,
            cfg.eval.enabled, cfg.eval.batch_size, cfg.eval.metrics, cfg.eval.max_new_tokens, cfg.eval.format,
            gold_set_hash(cfg), hashed_section(cfg, "prompt"), fp.device["device"], fp.device["precision"],
            fp.numeric_env)


def run(ctx: StageContext, out_dir: Path, work_dir: Path) -> Evaluated:
    cfg, tokenized, trained = ctx.cfg, ctx["tokenize"], ctx["train"]
    spec = ctx.fp.model_spec
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    manifest = predict_split(cfg, spec, tok, tokenized.to_json(), tokenized.folder, trained.to_json(), trained.folder,
                             ctx.fp.device_plan, out_dir)
    atomic_write_json(out_dir / "metrics.json", manifest["metrics"])
    return Evaluated.from_json(manifest)


def baseline_key_inputs(ctx: StageContext) -> tuple:
    """No training in it (every run of this model and data reuses it), but the base's quantization (QLoRA)."""
    cfg, fp = ctx.cfg, ctx.fp
    return ("baseline", ctx["tokenize"].output_hash, fp.model_identity, cfg.task, cfg.eval.enabled,
            cfg.eval.baseline, cfg.eval.batch_size, cfg.eval.metrics, cfg.eval.max_new_tokens, cfg.eval.format,
            fp.device["device"], fp.device["precision"], fp.numeric_env, *baseline_key_parts(cfg.lora))


def run_baseline(ctx: StageContext, out_dir: Path, work_dir: Path) -> Baseline:
    """The untuned base model on the split, loaded as the adapter's base is: the gain is fine-tuning alone."""
    cfg, tokenized = ctx.cfg, ctx["tokenize"]
    if cfg.task != "sft" or not cfg.eval.baseline or not cfg.eval.enabled or tokenized.eval_split is None:
        why = ("classification heads start random, so the base model has no meaningful score"
               if cfg.task != "sft" else "eval.baseline is false or evaluation is skipped")
        return Baseline(stage="baseline", skipped=True, note=why, split=None, metrics={})
    spec = ctx.fp.model_spec
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    quantization = baseline_load_plan(cfg.lora)["quantization"]
    if quantization == "none":
        manifest = predict_split(cfg, spec, tok, tokenized.to_json(), tokenized.folder, None, None,
                                 ctx.fp.device_plan, out_dir)
    else:  # the trained adapter's own load path (quantized base + adapter), with an all-zero adapter
        untrained = write_untrained_adapter(cfg, spec, work_dir)
        base_cfg = replace(cfg, eval=replace(cfg.eval, gold_set=None))  # the gold set scores the tuned model only
        manifest = predict_split(base_cfg, spec, tok, tokenized.to_json(), tokenized.folder, untrained, work_dir,
                                 ctx.fp.device_plan, out_dir)
    return Baseline.from_json(dict(manifest, stage="baseline", quantization=quantization))


STAGE = Stage("evaluate", "evaluate", "evaluate/1", __name__, key_inputs, run, Evaluated, needs=("tokenize", "train"),
              retries="eval", description="Score every evaluation example with the reloaded adapter.")
# the baseline shares evaluate's code and version: the same prediction path, without the adapter
BASELINE = Stage("baseline", "evaluate-baseline", "evaluate/1", __name__, baseline_key_inputs, run_baseline, Baseline,
                 needs=("tokenize",), retries="eval",
                 description="Score the untuned base model once per model, data and quantization.")
