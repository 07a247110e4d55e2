from pathlib import Path

from prefect import task

from verifily_train import stages
from verifily_train.tasks.common import STAGE_OPTIONS


@task(name="write-artifact", retries=1, **STAGE_OPTIONS)
def write_artifact(cfg, run_id: str, started_at: str, started_clock: float, validated: dict, tokenized: dict,
                   trained: dict, train_dir: str, evaluated: dict, eval_dir: str, sliced: dict, slice_dir: str,
                   hard: dict, hard_dir: str, runs_dir: str) -> dict:
    """Assemble, checksum and publish the immutable Run folder."""
    return stages.write_artifact_stage(cfg, run_id, started_at, started_clock, validated, tokenized, trained,
                                       Path(train_dir), evaluated, Path(eval_dir), sliced, Path(slice_dir), hard,
                                       Path(hard_dir), Path(runs_dir))
