from pathlib import Path

from prefect import task

from verifily_train import stages
from verifily_train.tasks.common import STAGE_OPTIONS


@task(name="slice-by-tags", retries=1, **STAGE_OPTIONS)
def slice_by_tags(cfg, tokenized: dict, evaluated: dict, eval_dir: str, out_dir: str) -> dict:
    """Metrics per tag value."""
    return stages.slice_stage(cfg, tokenized, evaluated, Path(eval_dir), Path(out_dir))
