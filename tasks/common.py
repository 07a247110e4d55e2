"""What every stage task shares: the retry condition, the task options, and the cache call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Completed

from verifily_train.pipeline.cache import CacheMode, run_cached
from verifily_train.errors import only_transient


def retry_only_transient(task, task_run, state) -> bool:
    """Prefect retry condition: a user error (``VerifilyError``) fails at once, other errors retry."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not isinstance(exc, BaseException) or only_transient(exc)


# Caching is by our own content-hash keys (verifily_train.pipeline.cache), which verify the files a hit points
# to; Prefect's result cache would hand back a manifest whose files may be gone, so it stays off.
STAGE_OPTIONS = dict(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_only_transient)


def run_stage(stage: str, key: str, cache: dict, compute: Callable[[Path, Path], dict]) -> dict:
    """Return the stage's manifest from the cache entry for ``key``, or compute and store it."""
    if os.environ.get("VERIFILY_FAIL_STAGE") == stage:  # fault injection for crash-recovery tests
        raise RuntimeError(f"injected failure in stage {stage} (VERIFILY_FAIL_STAGE)")
    pause = _test_pause(stage)
    if pause:  # a window for kill tests to land inside the stage, after its temporary folder exists
        inner = compute

        def compute(out: Path, work: Path) -> dict:
            import time

            manifest = inner(out, work)
            time.sleep(pause)
            return manifest
    manifest = run_cached(stage, key, Path(cache["root"]), CacheMode(read=cache["read"], write=cache["write"]), compute)
    if manifest.get("cache_hit"):  # shown as "Cached" in the Prefect UI; the flow unwraps it with ``value``
        return Completed(name="Cached", message=f"verifily cache hit {key[:12]}", data=manifest)
    return manifest


def value(result):
    """A stage task's manifest, whether it returned it or a Cached state holding it."""
    return result.result() if isinstance(result, State) else result


def _test_pause(stage: str) -> float:
    """``VERIFILY_PAUSE_STAGE=<stage>:<seconds>`` (kill tests only)."""
    name, _, seconds = os.environ.get("VERIFILY_PAUSE_STAGE", "").partition(":")
    return float(seconds or 0) if name == stage else 0.0
