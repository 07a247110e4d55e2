"""One ablation run of an attribution in its own process (``verifily_train.attribution.workers.run_worker``).

``python -m verifily_train.flows.ablation_worker --job JOB --result PATH --parent PID``: ``JOB`` is JSON
``{"config": <train.yaml path>, "overrides": [...], "runs_dir": ...}``; the worker runs the ``train`` flow and
writes ``{"path": ..., "run_id": ...}`` to ``PATH``. It ends when its parent ``PID`` ends.
"""

from __future__ import annotations

import sys
import warnings
from typing import List

from verifily_train.attribution.workers import exit_with_parent, parse_worker_args, write_result


def main(argv: List[str]) -> int:
    """Run the ``train`` flow for one arm and seed; write where its Run is."""
    job, result, parent = parse_worker_args(argv)
    exit_with_parent(parent)
    warnings.filterwarnings("ignore")
    from verifily_train.flows.train import train  # after the filter: importing the flow imports Prefect

    summary = train(config=job["config"], overrides=job["overrides"], runs_dir=job["runs_dir"])
    write_result(result, {"path": summary["path"], "run_id": summary["run_id"]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
