"""The ``train`` flow: validate manifest -> tokenize -> train LoRA -> evaluate -> slice -> hard examples -> artifact."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Union

from prefect import flow, get_run_logger

from verifily_train.pipeline import replay

from verifily_train.pipeline import claims as retrain
from verifily_train.artifacts.run import discard, new_run_id, utc_now, write_failed_run
from verifily_train.pipeline.cache import CacheMode, cache_root, release_held
from verifily_train.config import load_config
from verifily_train.config.schema import OutputSection
from verifily_train.fsio import verifily_home
from verifily_train.pipeline.stages import job_record, push_adapter, run_summary, stage_report
from verifily_train.flows.report import publish_comparison, publish_run_artifacts
from verifily_train.tasks.common import value
from verifily_train.tasks.evaluate import evaluate, evaluate_baseline
from verifily_train.tasks.hard_examples import mine_hard_examples
from verifily_train.tasks.slice import slice_by_tags
from verifily_train.tasks.tokenize import tokenize
from verifily_train.tasks.train import train_lora
from verifily_train.tasks.validate import fingerprint, validate
from verifily_train.tasks.write_artifact import write_artifact

MANAGED_MESSAGE = ("Managed mode coming soon: nothing was sent anywhere and nothing was trained. "
                   "Use the local or self-host pool.")


LAST_SUMMARY: Optional[dict] = None  # the summary of the last Run this process's train flow completed


def run_name() -> str:
    """``sft-ds_x@v2-1a2b3c4d``: task, resolved dataset version, short config hash (the UI's runs list)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        from verifily_train.config.loader import config_hash
        from verifily_train.dataset.store import resolve_manifest_path

        cfg = load_config(params.get("config"), params.get("overrides") or [], dataset=params.get("dataset"))
        ref = cfg.dataset_version or "data_paths"
        if ref.endswith("@latest"):
            ref = f"{ref.split('@')[0]}@{resolve_manifest_path(ref).parent.name}"
        elif ref.endswith(".json"):
            ref = Path(ref).parent.parent.name + "@" + Path(ref).parent.name
        return f"{cfg.task}-{ref}-{config_hash(cfg)[:8]}"
    except Exception:  # a bad config fails in the flow itself, with its own message
        return f"train-{params.get('dataset') or 'config'}"


def _runs_dir(cfg, runs_dir: Optional[str]) -> Path:
    """Deployment runs land in ``$VERIFILY_HOME/runs`` unless the config names an output.dir."""
    if runs_dir:
        return Path(os.path.expandvars(os.path.expanduser(runs_dir)))
    from prefect.runtime import deployment

    if deployment.id and cfg.output.dir == OutputSection.dir:
        return verifily_home() / "runs"
    return Path(cfg.output.dir)


@flow(name="train", flow_run_name=run_name, log_prints=False, validate_parameters=False)
def train(config: Optional[Union[str, dict]] = None, overrides: Optional[List[str]] = None,
          dataset: Optional[str] = None, runs_dir: Optional[str] = None, refresh: bool = False,
          once: bool = False) -> dict:
    """Train a LoRA adapter on a DatasetVersion and write an immutable Run; returns the run summary.

    ``config`` is a train.yaml path or the config as a mapping; ``overrides`` are dotted key=value strings.
    ``once`` (retraining): skip when this dataset version was already trained (or is being trained)
    under the same training config.
    """
    cfg = load_config(config, overrides or [], dataset=dataset)
    logger = get_run_logger()
    if cfg.compute.mode == "managed":
        logger.info(MANAGED_MESSAGE)
        return {"status": "not_run", "message": MANAGED_MESSAGE}
    run_id = new_run_id()
    started_at, started_clock = utc_now(), time.time()
    runs = _runs_dir(cfg, runs_dir)
    cache = {"root": str(cache_root(cfg.cache.dir)), **asdict(CacheMode.from_flags(cfg.cache.enabled, refresh))}
    # bad config, data or model fail here, before any run folder exists
    fp = value(fingerprint(cfg, cache))
    training_hash = retrain.training_config_hash(cfg)
    key = retrain.claim_key(fp["data_hash"], training_hash)
    owner = f"{run_id}:{os.getpid()}"
    if once:
        held = retrain.claim(key, {"owner": owner, "dataset_ref": fp["dataset"]["ref"], "claimed_at": utc_now()})
        if held is not None:
            logger.info(f"{fp['dataset']['ref']} is already {held.get('status')} under this training config "
                        f"({held.get('run_path') or held.get('owner')}): not training it again")
            return {"status": "skipped", "dataset": fp["dataset"]["ref"], "claim": held}
    try:
        validated = value(validate(cfg, fp, cache))
    except BaseException:
        if once:
            retrain.release(key, owner)
        raise
    done = {"validate": validated}
    try:
        done["tokenize"] = tokenized = value(tokenize(cfg, fp, cache))
        done["train"] = trained = value(train_lora.with_options(retries=cfg.training.retries)(cfg, fp, tokenized, cache))
        retries = cfg.eval.retries
        done["evaluate"] = evaluated = value(evaluate.with_options(retries=retries)(cfg, fp, tokenized, trained, cache))
        done["baseline"] = baseline = value(evaluate_baseline.with_options(retries=retries)(cfg, fp, tokenized, cache))
        done["slice"] = sliced = value(slice_by_tags.with_options(retries=retries)(cfg, tokenized, evaluated, baseline,
                                                                                     cache))
        done["hard_examples"] = hard = value(mine_hard_examples.with_options(retries=retries)(cfg, evaluated, cache))
        written = write_artifact(cfg, run_id, started_at, started_clock, fp, validated, tokenized, trained,
                                 evaluated, baseline, sliced, hard, str(runs))
    except BaseException as err:
        if once:
            retrain.release(key, owner)
        if isinstance(err, Exception):
            dataset_summary = dict(validated["dataset"], manifest_path=fp["dataset"]["manifest_path"],
                                   data_path=fp["dataset"]["data_path"])
            record = {"job": job_record(cfg, run_id, started_at, dataset_summary, None), "started_at": started_at,
                      "duration_seconds": round(time.time() - started_clock, 3), "metrics": {},
                      "stages": stage_report(done)}
            write_failed_run(runs, run_id, record, err)
        raise
    finally:
        if not cache["write"]:  # cache off: the stages computed into private folders nobody else reads
            for manifest in done.values():
                if ".private-" in str(manifest.get("dir", "")):
                    discard(Path(manifest["dir"]).parent)
        release_held()  # the entries this run read are in the Run now: cache clear may delete them
    summary = run_summary(written, evaluated, sliced, hard)
    global LAST_SUMMARY
    LAST_SUMMARY = summary  # the Run is complete: a later failure of Prefect's API must not disown it
    retrain.complete_run(cfg, fp, validated, written)
    if cache["write"]:  # the next identical run can be answered from these entries (verifily_train/pipeline/replay.py)
        replay.remember(cfg, fp, done, Path(cache["root"]))
    publish_run_artifacts(summary)
    ds = validated["dataset"]
    previous = retrain.previous_run(training_hash, ds["dataset_id"], ds.get("created_at") or "", ds["version"])
    if previous is not None:
        summary["compared_with"] = publish_comparison(Path(previous["run_path"]), Path(written["path"]))
    if cfg.output.push_to_hub:
        summary["pushed_to"] = push_adapter(cfg, Path(written["path"]))
    return summary
