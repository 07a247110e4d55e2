"""Submit a deployment run to a work pool and follow it: ``verifily train --mode self_host``."""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from typing import List, Optional

from verifily_train.errors import EnvironmentProblem, VerifilyError

SELF_HOST_DEPLOYMENT = "train/self-host"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# How long a submitted run waits for a worker to pick it up while no worker polls its pool: then it is
# cancelled (a worker started next week would train it unwatched) and the command exits 2. While a worker
# polls the pool (busy with other runs), the run waits for it without a limit.
WORKER_WAIT_SECONDS = 300.0


def serving_workers(client, pool: str) -> List[str]:
    """The workers that poll ``pool`` now: not marked offline, and a heartbeat within three of their intervals."""
    now = datetime.now(timezone.utc)
    names = []
    for worker in client.read_workers_for_work_pool(pool):
        beat = worker.last_heartbeat_time
        interval = worker.heartbeat_interval_seconds or 30
        status = getattr(worker.status, "value", worker.status)
        if beat is not None and status != "OFFLINE" and (now - beat).total_seconds() <= 3 * interval + 5:
            names.append(worker.name)
    return names


def _cancel(client, run, message: str) -> None:
    from prefect.states import Cancelled

    client.set_flow_run_state(run.id, Cancelled(message=message), force=True)


def submit_and_follow(parameters: dict, deployment: str = SELF_HOST_DEPLOYMENT, poll: float = 1.0,
                      out=sys.stdout, worker_wait: Optional[float] = None) -> int:
    """Create a flow run of ``deployment``, print its state changes and logs until it ends; 0 when completed.

    No worker polling the deployment's pool is said in one line at submission; a run no worker picked up
    within ``worker_wait`` seconds (``WORKER_WAIT_SECONDS``) while none polls the pool, or one the user
    interrupts (Ctrl-C) before a worker picked it up, is cancelled.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.exceptions import ObjectNotFound

    worker_wait = WORKER_WAIT_SECONDS if worker_wait is None else worker_wait

    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise VerifilyError(None, "--mode", f"the Prefect server has no deployment {deployment!r}: deploy "
                                                f"prefect.yaml (verifily stack up, or prefect deploy --all)") from None
        pool = found.work_pool_name
        idle = bool(pool) and not serving_workers(client, pool)
        run = client.create_flow_run_from_deployment(found.id, parameters=parameters)
        out.write(f"submitted flow run {run.name} ({run.id}) to work pool {pool!r}; "
                  f"a worker on that pool trains it\n")
        if idle:
            out.write(f"no worker serves work pool {pool!r} (none has polled it lately): start one where the run "
                      f"should train (prefect worker start --pool {pool}); waiting {worker_wait:g} s for one, "
                      "then the run is cancelled\n")
        out.flush()
        shown_state: Optional[str] = None
        seen_logs, task_names = 0, {}
        picked_up, deadline = False, time.monotonic() + worker_wait
        while True:
            run = client.read_flow_run(run.id)
            state = run.state
            picked_up = picked_up or (state is not None and state.type.value != "SCHEDULED")
            if not picked_up and pool and time.monotonic() > deadline:
                if serving_workers(client, pool):  # a worker polls it, busy with other runs: wait for it
                    deadline = time.monotonic() + worker_wait
                else:
                    _cancel(client, run, f"no worker picked it up within {worker_wait:g} s")
                    raise EnvironmentProblem(None, f"work pool {pool}", f"no worker picked up flow run {run.name} "
                                             f"within {worker_wait:g} s and none polls the pool, so the run is "
                                             f"cancelled: start a worker (prefect worker start --pool {pool}) "
                                             "and submit again")
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                                    sort=LogSort.TIMESTAMP_ASC, offset=seen_logs, limit=200)
            for log in logs:
                if log.task_run_id is not None and log.task_run_id not in task_names:
                    task_names[log.task_run_id] = client.read_task_run(log.task_run_id).name
                if log.level >= 20 and log.message:
                    where = f"{task_names[log.task_run_id]}: " if log.task_run_id is not None else ""
                    out.write(f"  | {where}{log.message.splitlines()[0]}\n")
            seen_logs += len(logs)
            if state is not None and state.name != shown_state:
                shown_state = state.name
                out.write(f"  state: {state.name}\n")
            out.flush()
            if state is not None and state.type.value in TERMINAL and not logs:
                break
            try:
                time.sleep(poll)
            except KeyboardInterrupt:
                if not picked_up:  # nobody trains it: leave nothing for a worker to start unwatched later
                    _cancel(client, run, "interrupted before a worker picked it up")
                raise
        if state.type.value == "COMPLETED":
            for artifact in client.read_artifacts(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))):
                if artifact.key == "run":
                    out.write("\n" + str(artifact.data) + "\n")
            return 0
        message = (state.message or "").splitlines()[0] if state.message else ""
        raise VerifilyError(None, f"flow run {run.name}", f"{state.name.lower()}: {message}")
