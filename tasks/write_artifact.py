from pathlib import Path

from prefect import task

from verifily_train.pipeline import stages
from verifily_train.tasks.common import STAGE_OPTIONS


@task(name="write-artifact", retries=1, **STAGE_OPTIONS)
def write_artifact(cfg, run_id: str, started_at: str, started_clock: float, fp: dict, validated: dict,
                   tokenized: dict, trained: dict, evaluated: dict, baseline: dict, sliced: dict, hard: dict, runs_dir: str) -> dict:
    """Assemble, checksum and publish the immutable Run folder (never cached: every run gets its own)."""
    return stages.write_artifact_stage(cfg, run_id, started_at, started_clock, fp, validated, tokenized, trained,
                                       evaluated, baseline, sliced, hard, Path(runs_dir))
