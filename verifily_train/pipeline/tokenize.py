"""Stage ``tokenize``: every split through the base model's tokenizer into parquet files of token ids."""

from __future__ import annotations

from pathlib import Path

from verifily_train.config.hashing import hashed_section
from verifily_train.model.loading import load_tokenizer
from verifily_train.model.tokenize import tokenize_dataset
from verifily_train.pipeline.manifests import max_row_tokens, model_spec
from verifily_train.pipeline.stage import Stage, StageContext
from verifily_train.pipeline.validate import current_version


def key_inputs(ctx: StageContext) -> tuple:
    cfg, fp = ctx.cfg, ctx.fp
    return (fp["data_hash"], fp["tokenizer_identity"], fp.get("chat_template_hash"), fp["model"]["kind"], cfg.task,
            hashed_section(cfg, "prompt"), max_row_tokens(cfg, fp))


def run(ctx: StageContext, out_dir: Path, work_dir: Path) -> dict:
    cfg = ctx.cfg
    dv = current_version(ctx)
    spec = model_spec(ctx.fp)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    max_len = max_row_tokens(cfg, ctx.fp)
    manifest = tokenize_dataset(dv, spec, tok, cfg.task, cfg.prompt, max_len, out_dir)
    if max_len < cfg.training.max_seq_length:  # said once, in the Run's warnings
        manifest["warnings"] = [f"the model reads at most {max_len} positions (max_position_embeddings): rows are "
                                f"cut at {max_len} tokens, not at training.max_seq_length="
                                f"{cfg.training.max_seq_length}"] + list(manifest.get("warnings") or [])
    return manifest


STAGE = Stage("tokenize", "tokenize", "tokenize/2", __name__, key_inputs, run, needs=("validate",),
              description="Tokenize every split into parquet files of token ids.")
