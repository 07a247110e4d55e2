"""One ablation run of the ``attribute`` flow in its own process: ``python -m verifily_train.flows.ablation_worker JOB``.

``JOB`` is JSON: ``{"config": <train.yaml path>, "overrides": [...], "runs_dir": ...}``. The last stdout line is
``{"path": ..., "run_id": ...}``; the parent's ``ablation_run`` task reads it (flows/attribute.py).
"""

from __future__ import annotations

import json
import sys
import warnings


def main(job: str) -> int:
    """Run the ``train`` flow for one arm and seed; print where its Run is."""
    warnings.filterwarnings("ignore")
    from verifily_train.flows.train import train  # after the filter: importing the flow imports Prefect

    spec = json.loads(job)
    summary = train(config=spec["config"], overrides=spec["overrides"], runs_dir=spec["runs_dir"])
    print(json.dumps({"path": summary["path"], "run_id": summary["run_id"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
