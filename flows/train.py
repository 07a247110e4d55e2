"""The ``train`` flow: validate manifest -> tokenize -> train LoRA -> evaluate -> slice -> hard examples -> artifact."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

from prefect import flow

from verifily_train.artifacts.run import discard, new_run_id, utc_now, write_failed_run
from verifily_train.config import load_config
from verifily_train.fsio import verifily_home
from verifily_train.stages import job_record, push_adapter
from verifily_train.tasks.evaluate import evaluate
from verifily_train.tasks.hard_examples import mine_hard_examples
from verifily_train.tasks.slice import slice_by_tags
from verifily_train.tasks.tokenize import tokenize
from verifily_train.tasks.train import train_lora
from verifily_train.tasks.validate import validate
from verifily_train.tasks.write_artifact import write_artifact


@flow(name="train", log_prints=False, validate_parameters=False)
def train(config: Optional[str] = None, overrides: Optional[List[str]] = None, dataset: Optional[str] = None,
          runs_dir: Optional[str] = None) -> dict:
    """Train a LoRA adapter on a DatasetVersion and write an immutable Run; returns the run summary."""
    cfg = load_config(config, overrides or [], dataset=dataset)
    run_id = new_run_id()
    started_at, started_clock = utc_now(), time.time()
    runs = Path(runs_dir or cfg.output.dir)
    work = verifily_home() / "work" / run_id
    dirs = {name: str(work / name) for name in ("tokenize", "train", "evaluate", "slice", "hard_examples")}
    validated = None
    try:
        validated = validate(cfg)
        tokenized = tokenize(cfg, validated, dirs["tokenize"])
        trained = train_lora.with_options(retries=cfg.training.retries)(
            cfg, validated, tokenized, dirs["tokenize"], dirs["train"])
        eval_retries = cfg.eval.retries
        evaluated = evaluate.with_options(retries=eval_retries)(
            cfg, validated, tokenized, dirs["tokenize"], trained, dirs["train"], dirs["evaluate"])
        sliced = slice_by_tags.with_options(retries=eval_retries)(
            cfg, tokenized, evaluated, dirs["evaluate"], dirs["slice"])
        hard = mine_hard_examples.with_options(retries=eval_retries)(
            cfg, evaluated, dirs["evaluate"], dirs["hard_examples"])
        written = write_artifact(cfg, run_id, started_at, started_clock, validated, tokenized, trained,
                                 dirs["train"], evaluated, dirs["evaluate"], sliced, dirs["slice"], hard,
                                 dirs["hard_examples"], str(runs))
    except Exception as err:
        if validated is None:  # bad config/data/model: the user fixes it; no run folder is created
            raise
        record = {"job": job_record(cfg, run_id, started_at, validated, None), "started_at": started_at,
                  "duration_seconds": round(time.time() - started_clock, 3), "metrics": {}}
        write_failed_run(runs, run_id, record, err)
        raise
    discard(work)
    summary = {"run_id": run_id, "path": written["path"], "record": written["record"], "slices": sliced,
               "hard_examples": hard, "evaluation": evaluated.get("note")}
    if cfg.output.push_to_hub:
        summary["pushed_to"] = push_adapter(cfg, Path(written["path"]))
    return summary
