"""The ``train`` flow: validate manifest -> tokenize -> train LoRA -> evaluate -> slice -> hard examples -> artifact."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from prefect import flow

from verifily_train.artifacts.run import discard, new_run_id, utc_now, write_failed_run
from verifily_train.cache import CacheMode, cache_root
from verifily_train.config import load_config
from verifily_train.stages import job_record, push_adapter, stage_report
from verifily_train.tasks.evaluate import evaluate, evaluate_baseline
from verifily_train.tasks.hard_examples import mine_hard_examples
from verifily_train.tasks.slice import slice_by_tags
from verifily_train.tasks.tokenize import tokenize
from verifily_train.tasks.train import train_lora
from verifily_train.tasks.validate import fingerprint, validate
from verifily_train.tasks.write_artifact import write_artifact


@flow(name="train", log_prints=False, validate_parameters=False)
def train(config: Optional[str] = None, overrides: Optional[List[str]] = None, dataset: Optional[str] = None,
          runs_dir: Optional[str] = None, refresh: bool = False) -> dict:
    """Train a LoRA adapter on a DatasetVersion and write an immutable Run; returns the run summary."""
    cfg = load_config(config, overrides or [], dataset=dataset)
    run_id = new_run_id()
    started_at, started_clock = utc_now(), time.time()
    runs = Path(runs_dir or cfg.output.dir)
    cache = {"root": str(cache_root(cfg.cache.dir)), **asdict(CacheMode.from_flags(cfg.cache.enabled, refresh))}
    # bad config, data or model fail here, before any run folder exists
    fp = fingerprint(cfg, cache)
    validated = validate(cfg, fp, cache)
    done = {"validate": validated}
    try:
        done["tokenize"] = tokenized = tokenize(cfg, fp, cache)
        done["train"] = trained = train_lora.with_options(retries=cfg.training.retries)(cfg, fp, tokenized, cache)
        retries = cfg.eval.retries
        done["evaluate"] = evaluated = evaluate.with_options(retries=retries)(cfg, fp, tokenized, trained, cache)
        done["baseline"] = baseline = evaluate_baseline.with_options(retries=retries)(cfg, fp, tokenized, cache)
        done["slice"] = sliced = slice_by_tags.with_options(retries=retries)(cfg, tokenized, evaluated, baseline,
                                                                               cache)
        done["hard_examples"] = hard = mine_hard_examples.with_options(retries=retries)(cfg, evaluated, cache)
        written = write_artifact(cfg, run_id, started_at, started_clock, fp, validated, tokenized, trained,
                                 evaluated, baseline, sliced, hard, str(runs))
    except Exception as err:
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
    summary = {"run_id": run_id, "path": written["path"], "record": written["record"], "slices": sliced,
               "hard_examples": hard, "evaluation": evaluated.get("note")}
    if cfg.output.push_to_hub:
        summary["pushed_to"] = push_adapter(cfg, Path(written["path"]))
    return summary
