"""Stage ``train``: fine-tune with LoRA (or fully) and save the adapter; checkpoints make it resumable."""

from __future__ import annotations

from pathlib import Path

from verifily_train.config.hashing import hashed_section
from verifily_train.model.loading import load_tokenizer
from verifily_train.pipeline.manifests import device_plan, model_spec
from verifily_train.pipeline.stage import Stage, StageContext


def key_inputs(ctx: StageContext) -> tuple:
    cfg, fp, tokenized = ctx.cfg, ctx.fp, ctx["tokenize"]
    processes = fp["device"].get("num_processes", 1)  # data-parallel ranks; the global batch follows from them
    return (tokenized["output_hash"], fp["model_identity"], fp["model"]["kind"], cfg.task,
            hashed_section(cfg, "training"), hashed_section(cfg, "lora"), cfg.seed, cfg.output.save_adapter_only,
            fp["device"]["device"], fp["device"]["precision"], fp["numeric_env"], processes,
            processes * cfg.training.batch_size * cfg.training.gradient_accumulation_steps)


def run(ctx: StageContext, out_dir: Path, work_dir: Path) -> dict:
    # here, not at the top: the trainer imports torch and transformers, and replay and the CLI read this
    # stage's declaration (its key) without them
    from verifily_train.training.trainer import train_adapter

    cfg, tokenized = ctx.cfg, ctx["tokenize"]
    spec = model_spec(ctx.fp)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    return train_adapter(cfg, spec, tok, tokenized, Path(tokenized["dir"]), device_plan(ctx.fp), out_dir, work_dir,
                         on_progress=ctx.on_progress)


STAGE = Stage("train", "train-lora", "train/2", __name__, key_inputs, run, needs=("tokenize",), retries="training",
              description="Fine-tune the base model with LoRA and save the adapter (resumes from the key's last "
                          "checkpoint).")
