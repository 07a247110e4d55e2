from pathlib import Path

from prefect import task

from verifily_train import stages
from verifily_train.tasks.common import STAGE_OPTIONS


@task(name="mine-hard-examples", retries=1, **STAGE_OPTIONS)
def mine_hard_examples(cfg, evaluated: dict, eval_dir: str, out_dir: str) -> dict:
    """The worst evaluation examples with their tags."""
    return stages.hard_examples_stage(cfg, evaluated, Path(eval_dir), Path(out_dir))
