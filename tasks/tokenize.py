from pathlib import Path

from prefect import task

from verifily_train import stages
from verifily_train.tasks.common import STAGE_OPTIONS


@task(name="tokenize", retries=1, **STAGE_OPTIONS)
def tokenize(cfg, validated: dict, out_dir: str) -> dict:
    """Tokenize every split into parquet files of token ids."""
    return stages.tokenize_stage(cfg, validated, Path(out_dir))
