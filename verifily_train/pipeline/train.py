"""Stage ``train``: fine-tune with LoRA (or fully) and save the adapter; checkpoints make it resumable."""

from __future__ import annotations

from pathlib import Path

from verifily_train.config.hashing import hashed_section
from verifily_train.model.loading import load_tokenizer
from verifily_train.pipeline.contract import Trained
from verifily_train.pipeline.stage import Stage, StageContext


def key_inputs(ctx: StageContext) -> tuple:
    cfg, fp, tokenized = ctx.cfg, ctx.fp, ctx["tokenize"]
    processes = fp.num_processes  # data-parallel ranks; the global batch follows from them
    return (tokenized.output_hash, fp.model_identity, fp.model["kind"], cfg.task,
            hashed_section(cfg, "training"), hashed_section(cfg, "lora"), cfg.seed, cfg.output.save_adapter_only,
            fp.device["device"], fp.device["precision"], fp.numeric_env, processes,
            processes * cfg.training.batch_size * cfg.training.gradient_accumulation_steps)


def run(ctx: StageContext, out_dir: Path, work_dir: Path) -> Trained:
    # here, not at the top: the trainer imports torch and transformers, and replay and the CLI read this
    # stage's declaration (its key) without them
    from verifily_train.training.trainer import train_adapter

    cfg, tokenized = ctx.cfg, ctx["tokenize"]
    spec = ctx.fp.model_spec
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    return Trained.from_json(train_adapter(cfg, spec, tok, tokenized.to_json(), tokenized.folder, ctx.fp.device_plan,
                                           out_dir, work_dir, on_progress=ctx.on_progress))


STAGE = Stage("train", "train-lora", "train/2", __name__, key_inputs, run, Trained, needs=("tokenize",),
              retries="training", reports_progress=True,
              description="Fine-tune the base model with LoRA and save the adapter (resumes from the key's last "
                          "checkpoint).")
