"""The ``attribute-rows`` flow (deployment ``attribute-rows/rows``): which train rows raised the target's loss.

The work is ``pipeline/row_orchestrate.attribute_rows`` (target gradients, the shards, the merge, each a
cached stage; ``verify`` K: retraining without the top-K rows and without K random rows over ``seeds``);
this flow gives it a runner whose steps are Prefect task runs: the stage tasks of ``tasks/common``, a shard
per task run (``concurrency`` at once; on a work pool, the worker running this flow runs them), and the
tag-level flow's ablation runs. Output: an immutable attribution folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from verifily_train.attribution.options import RowOptions
from verifily_train.attribution.stats import DEFAULT_SEEDS
from verifily_train.flows.attribute import TaskRunner
from verifily_train.pipeline import row_output
from verifily_train.pipeline.row_attribution import DEFAULT_PROJECTION_DIM, MERGE, SHARD, TARGET
from verifily_train.pipeline.row_orchestrate import attribute_rows as attribute_rows_in_library
from verifily_train.pipeline.row_orchestrate import derive_top as derive_top_rows
from verifily_train.tasks.common import stage_task, value

derive_top = task(name="derive-without-top-rows", cache_policy=NO_CACHE, persist_result=False)(derive_top_rows)


class RowTaskRunner(TaskRunner):
    """The ``--rows`` steps as task runs: each stage through the task factory, a shard per named task run."""

    def __init__(self, deployment: Optional[str] = None):
        super().__init__(deployment, tasks={"row_target": stage_task(TARGET), "row_merge": stage_task(MERGE),
                                            "derive_top": derive_top})

    def start(self, step: str, *args):
        if step == "row_shard":
            ctx, cache, index, count = args
            named = stage_task(SHARD).with_options(task_run_name=f"row-gradient-shard-{index + 1}-of-{count}")
            return named.submit(ctx, cache)
        return super().start(step, *args)

    def outcome(self, handle):
        return value(handle.result())  # a stage task's Cached state holds its manifest


@flow(name="attribute-rows", log_prints=False, validate_parameters=False)
def attribute_rows(run: str, target: str = "test", checkpoints: Optional[int] = None, shards: int = 1,
                   projection_dim: int = DEFAULT_PROJECTION_DIM, seed: int = 0,
                   methods: Optional[List[str]] = None, verify: int = 0,
                   seeds: int = DEFAULT_SEEDS, budget_steps: Optional[int] = None,
                   budget_fraction: Optional[float] = None, concurrency: int = 2, out_dir: Optional[str] = None,
                   deployment: Optional[str] = None, alpha: float = 0.05, correction: str = "holm",
                   bootstrap_samples: int = 1000, select: Optional[str] = None, same_rows: bool = False,
                   verify_by: Optional[str] = None) -> dict:
    """Score every train row of a completed run (suspect rows; attribution: the estimated effect on the
    target's loss); optionally check the top ``verify`` rows by retraining, ranked against ``select``
    (default val) and confirmed on ``target``. Returns attribution.json's content with ``path``."""
    options = RowOptions(run=run, target=target, checkpoints=checkpoints, shards=shards,
                         projection_dim=projection_dim, seed=seed, methods=methods, verify=verify, seeds=seeds,
                         budget_steps=budget_steps, budget_fraction=budget_fraction, concurrency=concurrency,
                         out_dir=out_dir, deployment=deployment, alpha=alpha, correction=correction,
                         bootstrap_samples=bootstrap_samples, select=select, same_rows=same_rows,
                         verify_by=verify_by)
    result = attribute_rows_in_library(options, RowTaskRunner(deployment))
    create_table_artifact(row_output.table_artifact_rows(result), key="row-attribution",
                          description=f"Row attribution of {Path(result['parent_run']).name} for the "
                                      f"{result['target']} loss: the most harmful and most helpful rows by "
                                      f"{result['default_method']} (higher = more harmful)")
    return result
