"""Every stage task from one factory: the retry condition, the task options, the cache call and the UI's state."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Completed

from verifily_train.errors import only_transient
from verifily_train.pipeline.fingerprint import fingerprint_stage
from verifily_train.pipeline.contract import Fingerprint
from verifily_train.pipeline.runner import CacheSettings, compute_stage, write_run
from verifily_train.pipeline.stage import Stage, StageContext


def retry_only_transient(task, task_run, state) -> bool:
    """Prefect retry condition: a user error (``VerifilyError``) fails at once, other errors retry."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not isinstance(exc, BaseException) or only_transient(exc)


# Caching is by our own content-hash keys (pipeline/cache.py), which verify the files a hit points to;
# Prefect's result cache would hand back a manifest whose files may be gone, so it stays off.
STAGE_OPTIONS = dict(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_only_transient)


@functools.lru_cache(maxsize=None)
def stage_task(stage: Stage):
    """The Prefect task of one pipeline stage (made once per stage and process)."""

    def run(ctx: StageContext, cache: CacheSettings):
        if stage.reports_progress:
            ctx = replace(ctx, on_progress=TrainingProgress())
        output = compute_stage(stage, ctx, cache)
        if ctx.on_progress is not None:
            ctx.on_progress(1, 1)  # a cache hit, or the last step: the bar ends at 100%
        if output.cache_hit:  # shown as "Cached" in the Prefect UI; the flow unwraps it with ``value``
            return Completed(name="Cached", message=f"verifily cache hit {output.key[:12]}", data=output)
        return output

    run.__doc__ = stage.description
    return task(name=stage.task_name, retries=1, **STAGE_OPTIONS)(run)


def value(result):
    """A stage task's output, whether it returned it or a Cached state holding it."""
    return result.result() if isinstance(result, State) else result


@task(name="fingerprint", retries=1, **STAGE_OPTIONS)
def fingerprint(cfg, cache: CacheSettings) -> Fingerprint:
    """Hash the data bytes, model and tokenizer files; check model kind, device and Hub credentials."""
    return fingerprint_stage(cfg, Path(cache.root))


@task(name="write-artifact", retries=1, **STAGE_OPTIONS)
def write_artifact(cfg, start, fp: Fingerprint, done: dict, runs_dir: Path, charts_dir) -> dict:
    """Assemble, checksum and publish the immutable Run folder (never cached: every run gets its own)."""
    return write_run(cfg, start, fp, done, runs_dir, charts_dir)


class TrainingProgress:
    """A Prefect progress artifact on the flow run, updated as optimizer steps complete (live in the UI)."""

    def __init__(self):
        self.artifact_id = None

    def __call__(self, step: int, max_steps: int) -> None:
        percent = 100.0 * step / max_steps if max_steps else 100.0
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, key="training-progress",
                                                            description="train-lora: percent of optimizer steps done")
            else:
                update_progress_artifact(self.artifact_id, percent)
        except Exception:  # the UI's progress bar must never fail a training run
            pass
