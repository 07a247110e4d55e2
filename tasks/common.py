"""What every stage task shares: the retry condition and the task options."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

from verifily_train.errors import only_transient


def retry_only_transient(task, task_run, state) -> bool:
    """Prefect retry condition: a user error (``VerifilyError``) fails at once, other errors retry."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not isinstance(exc, BaseException) or only_transient(exc)


# Stages hand each other small JSON manifests; caching by content hash is added per stage key.
STAGE_OPTIONS = dict(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_only_transient)
