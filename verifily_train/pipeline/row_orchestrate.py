"""``verifily attribute RUN --rows`` from plan to published folder, with no Prefect.

Target gradients, one gradient pass per shard of the train rows (``concurrency`` at once), the merge: each a
cached stage (``pipeline/row_attribution.py``), run through an injected runner
(``attribution/orchestrate.Runner``: here :func:`compute_stage` on threads; in the ``attribute-rows`` flow,
Prefect task runs). ``verify`` K ranks against ``select`` (default val), retrains without the top-K rows and
without K random rows over ``seeds`` and tests the difference with the one-draw test. Output: an immutable
attribution folder (``row_output.publish``).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import List

import pandas as pd

from verifily_train.artifacts.run import find_run, load_run_json, utc_now
from verifily_train.attribution.analysis import FULL, control_arm, per_example
from verifily_train.attribution.derive_rows import derive_without_rows, rows_digest
from verifily_train.attribution.options import RowOptions, check_options
from verifily_train.attribution.orchestrate import ArmJob, Runner, dataset_overrides, run_arms, run_bounded
from verifily_train.attribution.plan import retrain_budget
from verifily_train.attribution.row_verify import (ARM, analyze_verification, check_selection, check_verify,
                                                   top_row_hashes, verify_method)
from verifily_train.config import TrainConfig, load_config
from verifily_train.dataset.store import load_for_config
from verifily_train.errors import VerifilyError
from verifily_train.pipeline import row_output
from verifily_train.pipeline.cache import cache_root, hold_exclusive, hold_stages, release_held
from verifily_train.pipeline.row_attribution import (DEFAULT_PROJECTION_DIM, MERGE, SHARD, TARGET, RowContext,
                                                     manifest, plan_for_call, shard_count, train_stage_seconds)
from verifily_train.pipeline.runner import CacheSettings, compute_stage


def derive_top(parent_cfg: TrainConfig, merged: dict, method: str, k: int, target: str) -> dict:
    """The parent's dataset without its ``k`` most harmful train rows by ``method`` (a store version)."""
    dv = load_for_config(parent_cfg.dataset_version, parent_cfg.data_paths, parent_cfg.task)
    table = pd.read_parquet(Path(merged["dir"]) / merged["file"])
    drop = set(top_row_hashes(table, method, k))
    rule = {"by": "row_attribution", "method": method, "top": k, "target": target, "scores": merged["output_hash"]}
    return derive_without_rows(dv, drop, rule, f"top-{k}-{method}-{rows_digest(drop)}")


def _run_shard(ctx: RowContext, cache: CacheSettings, index: int, count: int) -> dict:
    return compute_stage(SHARD, ctx, cache)


ROW_STEPS = {"row_target": lambda ctx, cache: compute_stage(TARGET, ctx, cache), "row_shard": _run_shard,
             "row_merge": lambda ctx, cache: compute_stage(MERGE, ctx, cache), "derive_top": derive_top}


def row_runner(train_arm=None, **kwargs) -> Runner:
    """A runner of the ``--rows`` steps in this process (``train_arm`` trains ``--verify``'s arms)."""
    return Runner(train_arm, steps=dict(ROW_STEPS, **kwargs.pop("steps", {})), **kwargs)


def row_stages(runner: Runner, plan, count: int, cache: CacheSettings, concurrency: int) -> dict:
    """Target gradients, the shards (``concurrency`` at once), the merge; their outputs as JSON mappings."""
    target = runner.call("row_target", RowContext(plan), cache)
    done = {"row_target": target}
    shards = run_bounded(runner, [("row_shard", RowContext(plan, (i, count), done), cache, i, count)
                                  for i in range(count)], concurrency)
    merged = runner.call("row_merge", RowContext(plan, (0, count), dict(done, row_shard=shards)), cache)
    return {"row_target": manifest(target), "row_shard": [manifest(m) for m in shards], "row_merge": manifest(merged)}


def _stage_report(done: dict) -> dict:
    entries = [("row_target", done["row_target"])] + [
        (f"row_shard[{i}]", m) for i, m in enumerate(done["row_shard"])] + [("row_merge", done["row_merge"])]
    return {name: {"key": m["key"], "cache_hit": bool(m.get("cache_hit")), "seconds": m.get("seconds")}
            for name, m in entries}


def verify_top(runner: Runner, cfg: TrainConfig, parent: Path, merged: dict, o: RowOptions,
               budget_overrides: List[str], runs_dir: Path, method: str) -> dict:
    """Retrain full / without top-K (by ``method``) / without K random rows at each seed; the one-draw verdict
    on the target."""
    top = runner.call("derive_top", cfg, merged, method, o.verify, o.target)
    removed = top["removed_rows"]
    controls = run_bounded(runner, [("derive_control", cfg, removed, cfg.seed + i) for i in range(o.seeds)], o.seeds)
    config = str(parent / "config.yaml")
    control = control_arm(removed)
    jobs = []
    for s in range(o.seeds):
        extra = budget_overrides + [f"seed={cfg.seed + s}"]
        for arm, data in ((FULL, []), (ARM, dataset_overrides(top["ref"])),
                          (control, dataset_overrides(controls[s]["ref"]))):
            jobs.append((arm, s, ArmJob(arm, cfg.seed + s, config, tuple(extra + data), str(runs_dir))))
    runner.log.info(f"--verify {o.verify}: {len(jobs)} retraining runs (full, without the top {removed} rows, "
                    f"without {removed} random rows; x {o.seeds} seeds), at most {o.concurrency} at once")
    arms = run_arms(runner, jobs, o.seeds, o.concurrency, (FULL, ARM, control))
    tables = {arm: [per_example(Path(p), cfg.task) for p in paths] for arm, paths in arms.items()}
    result = analyze_verification(cfg.task, tables, removed, top["kept_rows"], top["ref"], o.target, o.alpha,
                                  o.correction, o.bootstrap_samples)
    result.update(derived=top, controls=controls, arms={a: [str(p) for p in v] for a, v in arms.items()})
    return result


def attribute_rows(options: RowOptions, runner: Runner) -> dict:
    """Score every train row of a completed run; optionally check the top ``verify`` rows by retraining. What
    it holds in the cache (the entries it reads, its output's name) stays held until its folder is published.
    Returns attribution.json's content with ``path``."""
    try:
        return _attribute_rows(options, runner)
    finally:
        release_held()


def _attribute_rows(o: RowOptions, runner: Runner) -> dict:
    started = time.perf_counter()
    log = runner.log
    parent = find_run(o.run).resolve()
    record = load_run_json(parent)
    cfg = load_config(str(parent / "config.yaml"))  # the one parse of the parent's config in this call
    cache = CacheSettings(str(cache_root(cfg.cache.dir)))
    hold_stages(Path(cache.root), record, ("tokenize", "train"))  # what the plan reads: `cache clear` keeps it
    projection = DEFAULT_PROJECTION_DIM if o.projection_dim is None else o.projection_dim
    plan = plan_for_call(parent, o.target, o.checkpoints, projection, o.seed, o.method_list, o.verify, o.select,
                         o.same_rows, cfg)
    selection = None
    if o.verify:
        selection = check_selection(plan, o.target, verify_method(plan.methods, o.verify_by), o.same_rows)
    count, notes = shard_count(plan, o.shards)
    notes = list(plan.notes) + notes
    budget_overrides, budget = retrain_budget(record, o.budget_steps, o.budget_fraction)
    if o.verify:
        check_options(o.seeds, o.alpha, o.correction)
        problem = check_verify(o.verify, plan.train_rows, o.seeds)
        if problem:
            raise VerifilyError(None, "--verify", problem)
    done = row_stages(runner, plan, count, cache, o.concurrency)
    merged = done["row_merge"]
    rows_seconds = time.perf_counter() - started
    train_seconds, source = train_stage_seconds(parent, record, cfg)
    settings = {"verify": o.verify, "seeds": o.seeds if o.verify else None,
                "budget": budget["max_steps"] if o.verify else None, "alpha": o.alpha if o.verify else None,
                "correction": o.correction if o.verify else None, "selection": selection}
    key = row_output.attribution_key(merged["output_hash"], settings)
    name = row_output.folder_name(parent, plan.target, key)
    folder = (Path(o.out_dir) if o.out_dir else row_output.default_parent(parent) / name).resolve()  # --out: the folder
    stages = _stage_report(done)
    # an identical call running now writes this same folder: wait for it, then reuse what it published
    hold_exclusive(Path(cache.root), "row_attributions", hashlib.sha256(str(folder).encode()).hexdigest())
    found = row_output.existing(folder)
    if found is not None:
        if found.get("key") != key:
            raise VerifilyError(folder, None, "already exists with other content; attribution folders are immutable")
        log.info(f"{folder} already holds this attribution: nothing written")
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
    if o.verify:
        runs_dir = folder.parent / f"{folder.name}-verify-runs"
        result["verify"] = dict(verify_top(runner, cfg, parent, merged, o, budget_overrides, runs_dir,
                                           selection["method"]), budget=budget, selection=selection)
        log.info(selection["note"])
        log.info(result["verify"]["summary"])
    row_output.publish(folder, merged, result)
    return dict(result, path=str(folder))
