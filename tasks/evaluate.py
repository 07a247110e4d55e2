from pathlib import Path

from prefect import task

from verifily_train import stages
from verifily_train.tasks.common import STAGE_OPTIONS


@task(name="evaluate", retries=1, **STAGE_OPTIONS)
def evaluate(cfg, validated: dict, tokenized: dict, tokenized_dir: str, trained: dict, train_dir: str,
             out_dir: str) -> dict:
    """Score every evaluation example with the reloaded adapter."""
    return stages.evaluate_stage(cfg, validated, tokenized, Path(tokenized_dir), trained, Path(train_dir),
                                 Path(out_dir))
