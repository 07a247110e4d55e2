from prefect import task

from verifily_train.pipeline import stages
from verifily_train.config.loader import hashed_section
from verifily_train.hashing import content_hash
from verifily_train.pipeline.codeversion import stage_code_version as code_version
from verifily_train.tasks.common import STAGE_OPTIONS, run_stage


@task(name="tokenize", retries=1, **STAGE_OPTIONS)
def tokenize(cfg, fp: dict, cache: dict) -> dict:
    """Tokenize every split into parquet files of token ids."""
    key = content_hash(code_version("tokenize"), fp["data_hash"], fp["tokenizer_identity"], fp.get("chat_template_hash"), fp["model"]["kind"], cfg.task, hashed_section(cfg, "prompt"), stages.max_row_tokens(cfg, fp))
    return run_stage("tokenize", key, cache, lambda out, work: stages.tokenize_stage(cfg, fp, out, work))
