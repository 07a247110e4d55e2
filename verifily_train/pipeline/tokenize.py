"""Stage ``tokenize``: every split through the base model's tokenizer into parquet files of token ids."""

from __future__ import annotations

from pathlib import Path

from verifily_train.config.hashing import hashed_section
from verifily_train.model.loading import load_tokenizer
from verifily_train.model.tokenize import tokenize_dataset
from verifily_train.pipeline.contract import Tokenized
from verifily_train.pipeline.stage import Stage, StageContext
from verifily_train.pipeline.validate import current_version


def key_inputs(ctx: StageContext) -> tuple:
    cfg, fp = ctx.cfg, ctx.fp
    return (fp.data_hash, fp.tokenizer_identity, fp.chat_template_hash, fp.model["kind"], cfg.task,
            hashed_section(cfg, "prompt"), fp.max_row_tokens(cfg))


def run(ctx: StageContext, out_dir: Path, work_dir: Path) -> Tokenized:
    cfg = ctx.cfg
    dv = current_version(ctx)
    spec = ctx.fp.model_spec
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    max_len = ctx.fp.max_row_tokens(cfg)
    manifest = tokenize_dataset(dv, spec, tok, cfg.task, cfg.prompt, max_len, out_dir)
    if max_len < cfg.training.max_seq_length:  # said once, in the Run's warnings
        manifest["warnings"] = [f"the model reads at most {max_len} positions (max_position_embeddings): rows are "
                                f"cut at {max_len} tokens, not at training.max_seq_length="
                                f"{cfg.training.max_seq_length}"] + list(manifest.get("warnings") or [])
    return Tokenized.from_json(manifest)


STAGE = Stage("tokenize", "tokenize", "tokenize/2", __name__, key_inputs, run, Tokenized, needs=("validate",),
              description="Tokenize every split into parquet files of token ids.")
