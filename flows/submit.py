"""Submit a deployment run to a work pool and follow it: ``verifily train --mode self_host``."""

from __future__ import annotations

import sys
import time
from typing import Optional
from verifily_train.errors import VerifilyError

SELF_HOST_DEPLOYMENT = "train/self-host"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def submit_and_follow(parameters: dict, deployment: str = SELF_HOST_DEPLOYMENT, poll: float = 1.0,
                      out=sys.stdout) -> int:
    """Create a flow run of ``deployment``, print its state changes and logs until it ends; 0 when completed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.exceptions import ObjectNotFound


    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise VerifilyError(None, "--mode", f"the Prefect server has no deployment {deployment!r}: deploy "
                                                f"prefect.yaml (verifily stack up, or prefect deploy --all)") from None
        run = client.create_flow_run_from_deployment(found.id, parameters=parameters)
        out.write(f"submitted flow run {run.name} ({run.id}) to work pool {found.work_pool_name!r}; "
                  f"a worker on that pool trains it\n")
        shown_state: Optional[str] = None
        seen_logs, task_names = 0, {}
        while True:
            run = client.read_flow_run(run.id)
            state = run.state
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
            time.sleep(poll)
        if state.type.value == "COMPLETED":
            for artifact in client.read_artifacts(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))):
                if artifact.key == "run":
                    out.write("\n" + str(artifact.data) + "\n")
            return 0
        message = (state.message or "").splitlines()[0] if state.message else ""
        raise VerifilyError(None, f"flow run {run.name}", f"{state.name.lower()}: {message}")
