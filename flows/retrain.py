"""The ``retrain`` flow (deployment ``retrain/watch``): train every new dataset version once."""

from __future__ import annotations

from typing import List, Optional, Union

from prefect import flow, get_run_logger

from verifily_train.pipeline import claims as retrain
from verifily_train.artifacts.run import utc_now
from verifily_train.flows.train import train


@flow(name="retrain", log_prints=False, validate_parameters=False)
def watch(config: Optional[Union[str, dict]] = None, overrides: Optional[List[str]] = None,
          datasets: Optional[List[str]] = None, latest_only: bool = True, runs_dir: Optional[str] = None) -> dict:
    """Find store versions with no completed (or running) training under this config and train them.

    ``datasets`` limits the search to these dataset ids; ``latest_only`` looks at the newest version of
    each dataset only. A version the event trigger is already training is skipped (shared claims).
    """
    logger = get_run_logger()
    probe = retrain.load_training_config(config, overrides)
    training_hash = retrain.training_config_hash(probe)
    pending = retrain.pending_versions(training_hash, probe.task, latest_only, datasets)
    logger.info(f"{len(pending)} version(s) to train: {', '.join(v['ref'] for v in pending) or 'none'}")
    results = {}
    for version in pending:
        try:
            summary = train(config=config, overrides=overrides, dataset=version["ref"], runs_dir=runs_dir, once=True)
            results[version["ref"]] = summary.get("path") or summary.get("status")
        except Exception as err:  # one bad version must not stop the others; its run records the failure
            logger.error(f"{version['ref']}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            results[version["ref"]] = f"failed: {type(err).__name__}"
    return {"trained": results, "checked_at": utc_now()}
