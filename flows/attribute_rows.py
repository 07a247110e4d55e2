"""The ``attribute`` flow of deployment ``attribute/rows``: which train rows raised the target's loss.

Target gradients, then one gradient pass per shard of the train rows, fanned out as Prefect task runs
(``concurrency`` at once; on a work pool, the worker running this flow runs them), then the merge: each a
cached pipeline stage (``pipeline/row_attribution.py``), so a second call is all cache hits. ``verify`` K
ranks against ``select`` (default val; a target-aware score never ranks with the rows it is confirmed on
unless ``same_rows``), retrains without the top-K rows and without K random rows (the tag-level flow's ablation runs, over
``seeds``) and tests the difference with the one-draw test (the K rows are one draw). Output: an immutable attribution folder.
"""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path
from typing import List, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from verifily_train import attribution
from verifily_train.attribution.row_verify import (ARM, analyze_verification, check_selection, check_verify,
                                                   top_row_hashes, verify_method)
from verifily_train.attribution.stats import DEFAULT_SEEDS
from verifily_train.errors import VerifilyError
from verifily_train.attribution.options import check_options
from verifily_train.attribution.plan import retrain_budget
from verifily_train.flows.attribute import ablation_run, derive_control
from verifily_train.pipeline import row_output
from verifily_train.pipeline.cache import cache_root, hold_exclusive, hold_stages, release_held
from verifily_train.pipeline.row_attribution import (DEFAULT_PROJECTION_DIM, MERGE, SHARD, TARGET, RowContext,
                                                     plan_for_call, shard_count, train_stage_seconds)
from verifily_train.pipeline.runner import CacheSettings
from verifily_train.tasks.common import stage_task, value


@task(name="derive-without-top-rows", cache_policy=NO_CACHE, persist_result=False)
def derive_top(parent_cfg, merged: dict, method: str, k: int, target: str) -> dict:
    """The parent's dataset without its ``k`` most harmful train rows by ``method`` (a store version)."""
    import pandas as pd

    from verifily_train.attribution.derive_rows import derive_without_rows, rows_digest
    from verifily_train.dataset.store import load_for_config

    dv = load_for_config(parent_cfg.dataset_version, parent_cfg.data_paths, parent_cfg.task)
    table = pd.read_parquet(Path(merged["dir"]) / merged["file"])
    drop = set(top_row_hashes(table, method, k))
    rule = {"by": "row_attribution", "method": method, "top": k, "target": target, "scores": merged["output_hash"]}
    return derive_without_rows(dv, drop, rule, f"top-{k}-{method}-{rows_digest(drop)}")


def _row_stages(plan, count: int, cache: CacheSettings, concurrency: int) -> dict:
    """Target gradients, the shards (``concurrency`` task runs at once), the merge; their manifests."""
    target = value(stage_task(TARGET)(RowContext(plan), cache))
    done = {"row_target": target}
    shard_task = stage_task(SHARD)
    shards: List[Optional[dict]] = [None] * count
    pending, active = list(range(count)), {}
    while pending or active:
        while pending and len(active) < max(1, concurrency):
            i = pending.pop(0)
            named = shard_task.with_options(task_run_name=f"row-gradient-shard-{i + 1}-of-{count}")
            active[named.submit(RowContext(plan, (i, count), done), cache)] = i
        finished = next(as_completed(list(active)))
        shards[active.pop(finished)] = value(finished.result())
    merged = value(stage_task(MERGE)(RowContext(plan, (0, count), dict(done, row_shard=shards)), cache))
    return {"row_target": target, "row_shard": shards, "row_merge": merged}


def _stage_report(done: dict) -> dict:
    entries = [("row_target", done["row_target"])] + [
        (f"row_shard[{i}]", m) for i, m in enumerate(done["row_shard"])] + [("row_merge", done["row_merge"])]
    return {name: {"key": m["key"], "cache_hit": bool(m.get("cache_hit")), "seconds": m.get("seconds")}
            for name, m in entries}


def _verify(cfg, parent: Path, merged: dict, k: int, seeds: int, budget_overrides: List[str],
            target: str, runs_dir: Path, concurrency: int, deployment, alpha: float, correction: str,
            bootstrap_samples: int, logger, method: str) -> dict:
    """Retrain full / without top-K (by ``method``) / without K random rows at each seed; the one-draw verdict
    on ``target``."""
    from prefect.client.orchestration import get_client

    top = derive_top(cfg, merged, method, k, target)
    removed = top["removed_rows"]
    controls = [f.result() for f in [derive_control.submit(cfg, removed, cfg.seed + i) for i in range(seeds)]]
    api_url = str(get_client().api_url).rstrip("/")
    config = str(parent / "config.yaml")

    def data(ref: str) -> List[str]:
        return [f"dataset_version={ref}", "data_paths.train=null", "data_paths.val=null", "data_paths.test=null"]

    control = attribution.control_arm(removed)
    jobs = []
    for s in range(seeds):
        extra = budget_overrides + [f"seed={cfg.seed + s}"]
        jobs += [(attribution.FULL, s, extra), (ARM, s, extra + data(top["ref"])),
                 (control, s, extra + data(controls[s]["ref"]))]
    logger.info(f"--verify {k}: {len(jobs)} retraining runs (full, without the top {removed} rows, without "
                f"{removed} random rows; x {seeds} seeds), at most {concurrency} at once")
    arms = {arm: [None] * seeds for arm in (attribution.FULL, ARM, control)}
    pending, active = list(jobs), {}
    while pending or active:
        while pending and len(active) < max(1, concurrency):
            arm, index, extra = pending.pop(0)
            future = ablation_run.submit(arm, cfg.seed + index, config, extra, str(runs_dir), api_url, deployment)
            active[future] = (arm, index)
        finished = next(as_completed(list(active)))
        arm, index = active.pop(finished)
        arms[arm][index] = finished.result()
    tables = {arm: [attribution.per_example(Path(p), cfg.task) for p in paths] for arm, paths in arms.items()}
    result = analyze_verification(cfg.task, tables, removed, top["kept_rows"], top["ref"], target, alpha, correction,
                                  bootstrap_samples)
    result.update(derived=top, controls=controls, arms={a: [str(p) for p in v] for a, v in arms.items()})
    return result


def _releasing_held(fn):
    """``fn``, then :func:`release_held` however it ends: what the flow holds (the cache entries it reads, its
    output's name) stays held until its output is published, not only while its stages run."""
    @functools.wraps(fn)
    def releasing(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release_held()

    return releasing


@flow(name="attribute", log_prints=False, validate_parameters=False)
@_releasing_held
def attribute_rows(run: str, target: str = "test", checkpoints: Optional[int] = None, shards: int = 1,
                   projection_dim: int = DEFAULT_PROJECTION_DIM, seed: int = 0,
                   methods: Optional[List[str]] = None, verify: int = 0,
                   seeds: int = DEFAULT_SEEDS, budget_steps: Optional[int] = None,
                   budget_fraction: Optional[float] = None, concurrency: int = 2, out_dir: Optional[str] = None,
                   deployment: Optional[str] = None, alpha: float = 0.05, correction: str = "holm",
                   bootstrap_samples: int = 1000, select: Optional[str] = None, same_rows: bool = False,
                   verify_by: Optional[str] = None) -> dict:
    """Score every train row of a completed run (suspect rows; attribution: the estimated effect on the
    target's loss); optionally check the top ``verify`` rows by retraining, ranked against ``select``
    (default val) and confirmed on ``target``. Returns attribution.json's content with ``path``."""
    from prefect.artifacts import create_table_artifact

    import yaml

    from verifily_train.artifacts.run import find_run, load_run_json, utc_now
    from verifily_train.config import load_config

    started = time.perf_counter()
    logger = get_run_logger()
    parent = find_run(run).resolve()
    record = load_run_json(parent)
    configured = (yaml.safe_load((parent / "config.yaml").read_text(encoding="utf-8")) or {}).get("cache") or {}
    cache = CacheSettings(str(cache_root(configured.get("dir"))))
    hold_stages(Path(cache.root), record, ("tokenize", "train"))  # what the plan reads: `cache clear` keeps it
    plan = plan_for_call(parent, target, checkpoints, projection_dim, seed, methods, verify, select, same_rows)
    selection = None
    if verify:
        selection = check_selection(plan, target, verify_method(plan.methods, verify_by), same_rows)
    count, notes = shard_count(plan, shards)
    notes = list(plan.notes) + notes
    budget_overrides, budget = retrain_budget(record, budget_steps, budget_fraction)
    if verify:
        check_options(seeds, alpha, correction)
        problem = check_verify(verify, plan.train_rows, seeds)
        if problem:
            raise VerifilyError(None, "--verify", problem)
    done = _row_stages(plan, count, cache, concurrency)
    merged = done["row_merge"]
    rows_seconds = time.perf_counter() - started
    train_seconds, source = train_stage_seconds(parent, record)
    settings = {"verify": verify, "seeds": seeds if verify else None, "budget": budget["max_steps"] if verify else None,
                "alpha": alpha if verify else None, "correction": correction if verify else None,
                "selection": selection}
    key = row_output.attribution_key(merged["output_hash"], settings)
    name = row_output.folder_name(parent, plan.target, key)
    folder = (Path(out_dir) if out_dir else row_output.default_parent(parent) / name).resolve()  # --out: the folder
    stages = _stage_report(done)
    # an identical call running now writes this same folder: wait for it, then reuse what it published
    hold_exclusive(Path(cache.root), "row_attributions", hashlib.sha256(str(folder).encode()).hexdigest())
    found = row_output.existing(folder)
    if found is not None:
        if found.get("key") != key:
            raise VerifilyError(folder, None, "already exists with other content; attribution folders are immutable")
        logger.info(f"{folder} already holds this attribution: nothing written")
        _table_artifact(found, parent, create_table_artifact)
        return dict(found, path=str(folder), reused=True, stages_now=stages, seconds_now=round(rows_seconds, 3))
    result = dict(row_output.summarize(merged, run=parent), kind="rows", key=key,
                  parent_run=str(parent), parent_dataset=record["job"]["dataset_version"].get("ref"),
                  target=plan.target, target_split=plan.target_split,
                  target_rows=done["row_target"].get("target_rows"), checkpoints=len(plan.snapshots),
                  snapshot_steps=[s["step"] for s in plan.snapshots], projection_dim=plan.projection_dim,
                  seed=plan.seed, shards=count, notes=notes, stages=stages, created_at=utc_now(),
                  method_note="defaults: " + ", ".join(f"{f} {e['default']}" for f, e in merged["families"].items())
                              + " (attribution/rows/plan.py DEFAULT_METHODS; docs/attribution.md says how each "
                                "was chosen)",
                  cost={"seconds": round(rows_seconds, 3), "train_stage_seconds": train_seconds,
                        "train_stage_source": source,
                        "ratio": round(rows_seconds / train_seconds, 3) if train_seconds else None,
                        "cache_hits": sum(1 for s in stages.values() if s["cache_hit"]), "stages": len(stages)})
    if verify:
        cfg = load_config(str(parent / "config.yaml"))
        runs_dir = folder.parent / f"{folder.name}-verify-runs"
        result["verify"] = dict(_verify(cfg, parent, merged, verify, seeds, budget_overrides, target,
                                        runs_dir, concurrency, deployment, alpha, correction, bootstrap_samples,
                                        logger, selection["method"]), budget=budget, selection=selection)
        logger.info(selection["note"])
        logger.info(result["verify"]["summary"])
    row_output.publish(folder, merged, result)
    _table_artifact(result, parent, create_table_artifact)
    return dict(result, path=str(folder))


def _table_artifact(result: dict, parent: Path, create_table_artifact) -> None:
    create_table_artifact(row_output.table_artifact_rows(result), key="row-attribution",
                          description=f"Row attribution of {parent.name} for the {result['target']} loss: the most "
                                      f"harmful and most helpful rows by {result['default_method']} "
                                      f"(higher = more harmful)")
