"""The ``attribute`` flow (deployment ``attribute/by-tag``): leave-one-value-out retraining, fanned out.

Each ablation run (an arm and a seed) is one task run. Locally it trains in its own process (a
``train`` flow run of its own, reporting to the same Prefect API), so runs proceed in parallel and
no two share a global RNG; ``concurrency`` bounds how many run at once. With ``deployment`` set, each
arm is submitted to that training deployment instead, so the work pool behind it (several workers,
a Docker or Kubernetes pool) spreads them; results must land on storage this flow can read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from verifily_train import attribution
from verifily_train.errors import RunError, VerifilyError


@task(name="derive-dataset", cache_policy=NO_CACHE, persist_result=False)
def derive(parent_cfg, by: str, value: str) -> dict:
    """The parent's dataset without the train rows tagged ``by: value`` (a store version; reused if present)."""
    from verifily_train.dataset.store import load_for_config

    dv = load_for_config(parent_cfg.dataset_version, parent_cfg.data_paths, parent_cfg.task)
    return attribution.derive_without(dv, by, value)


@task(name="ablation-run", cache_policy=NO_CACHE, persist_result=False, retries=1,
      task_run_name="ablation-{arm}-seed{seed}")
def ablation_run(arm: str, seed: int, config: str, overrides: List[str], runs_dir: str, api_url: str,
                 deployment: Optional[str] = None) -> str:
    """Train one arm with one seed; returns the Run folder (the train flow's cached stages are reused)."""
    if deployment:
        return _via_deployment(deployment, config, overrides, runs_dir)
    job = json.dumps({"config": config, "overrides": overrides, "runs_dir": runs_dir})
    env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="CRITICAL",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    done = subprocess.run([sys.executable, "-m", "verifily_train.flows.attribute", job], env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = [ln for ln in done.stderr.splitlines() if ln.strip()][-1:] or [f"exit {done.returncode}"]
        raise RuntimeError(f"ablation {arm} seed {seed} failed: {tail[0]}")
    return json.loads(lines[-1])["path"]


def _via_deployment(deployment: str, config: str, overrides: List[str], runs_dir: str) -> str:
    from prefect.deployments import run_deployment

    from verifily_train.config.loader import read_yaml

    run = run_deployment(deployment, parameters={"config": read_yaml(Path(config)), "overrides": overrides,
                                                 "runs_dir": runs_dir}, as_subflow=True)
    if not run.state.is_completed():
        raise RuntimeError(f"ablation run {run.name} ended {run.state.name}: {run.state.message}")
    return run.state.result()["path"]


@task(name="attribution-analysis", cache_policy=NO_CACHE, persist_result=False)
def analyze(task_name: str, by: str, arms: dict, derived: dict, bootstrap_samples: int) -> dict:
    return attribution.analyze(task_name, by, {k: [Path(p) for p in v] for k, v in arms.items()}, derived,
                               bootstrap_samples)


@flow(name="attribute", log_prints=False, validate_parameters=False)
def attribute(run: str, by: str = "source", values: Optional[List[str]] = None, seeds: int = 3,
              budget_steps: Optional[int] = None, budget_fraction: Optional[float] = None, concurrency: int = 2,
              out_dir: Optional[str] = None, deployment: Optional[str] = None, bootstrap_samples: int = 1000) -> dict:
    """Retrain the parent run without each value of tag ``by`` (and with all data), ``seeds`` times each."""
    from prefect.artifacts import create_table_artifact
    from prefect.client.orchestration import get_client

    from verifily_train.artifacts.run import find_run, load_run_json, utc_now
    from verifily_train.config import load_config
    from verifily_train.fsio import atomic_write_json

    logger = get_run_logger()
    parent = find_run(run)
    record = load_run_json(parent)
    if record.get("status") != "completed":
        raise RunError(parent, None, "only a completed run can be attributed")
    parent_config = str(parent / "config.yaml")
    cfg = load_config(parent_config)
    chosen = _values(record, by, values, parent)
    overrides, budget = _budget(record, budget_steps, budget_fraction)
    out = Path(out_dir) if out_dir else parent.parent.parent / "attributions" / f"{parent.name}-by-{by}"
    runs_dir = str((out / "runs").resolve())
    derived = {v: f.result() for v, f in zip(chosen, [derive.submit(cfg, by, v) for v in chosen])}
    api_url = str(get_client().api_url).rstrip("/")
    jobs = []
    for arm in [attribution.FULL] + chosen:
        data = [] if arm == attribution.FULL else [f"dataset_version={derived[arm]['ref']}", "data_paths.train=null",
                                                   "data_paths.val=null", "data_paths.test=null"]
        for s in range(seeds):
            jobs.append((arm, cfg.seed + s, overrides + data + [f"seed={cfg.seed + s}"]))
    logger.info(f"{len(jobs)} ablation runs ({1 + len(chosen)} arms x {seeds} seeds), at most {concurrency} at once")
    arms: dict = {arm: [None] * seeds for arm in [attribution.FULL] + chosen}
    pending, active = list(jobs), {}
    while pending or active:
        while pending and len(active) < max(1, concurrency):
            arm, seed, extra = pending.pop(0)
            future = ablation_run.submit(arm, seed, parent_config, extra, runs_dir, api_url, deployment)
            active[future] = (arm, seed - cfg.seed)
        finished = next(as_completed(list(active)))
        arm, index = active.pop(finished)
        arms[arm][index] = finished.result()
    result = analyze(cfg.task, by, arms, derived, bootstrap_samples)
    result.update(parent_run=str(parent), parent_dataset=record["job"]["dataset_version"].get("ref"),
                  budget=budget, concurrency=concurrency, created_at=utc_now(),
                  arms={k: [str(p) for p in v] for k, v in arms.items()}, derived=derived)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "attribution.json", result)
    (out / "attribution.html").write_text(attribution.render_html(result), encoding="utf-8")
    metric = result["primary_metric"]
    create_table_artifact([{"removed": f"{by}={v}", "rows_removed": e["removed_rows"], "verdict": e["verdict"],
                            f"delta_{metric}_other_rows": round(e["slices"][e["verdict_slice"]][metric]["effect"], 4),
                            "paired_ci95": e["slices"][e["verdict_slice"]][metric]["bootstrap_ci95"],
                            "seed_ci95": e["slices"][e["verdict_slice"]][metric]["seed_ci95"]}
                           for v, e in result["values"].items()], key="attribution",
                          description=f"Causal attribution by retraining, by {by} ({budget['description']})")
    return dict(result, path=str(out))


def _values(record: dict, by: str, values: Optional[List[str]], parent: Path) -> List[str]:
    """The tag values to remove: the given ones (checked against the dataset's tag schema) or all of them."""
    schema = (record["job"]["dataset_version"].get("tag_schema") or {}).get(by) or {}
    known = sorted(str(v) for v in schema.get("values", []))
    if by not in (record["job"]["dataset_version"].get("tag_schema") or {}):
        tags = ", ".join(record["job"]["dataset_version"].get("tag_schema") or {}) or "none"
        raise VerifilyError(None, "--by", f"the run's dataset has no tag {by!r} (tags: {tags})")
    if values:
        unknown = [v for v in values if known and v not in known]
        if unknown:
            raise VerifilyError(None, "--values", f"{unknown[0]!r} is not a value of tag {by!r} "
                                                  f"(values: {', '.join(known)})")
        return list(values)
    if not known:
        raise VerifilyError(None, "--by", f"tag {by!r} is not categorical: give the values with --values")
    return known


def _budget(record: dict, steps: Optional[int], fraction: Optional[float]):
    parent_steps = int(record.get("metrics", {}).get("train_steps") or 0)
    if steps is not None and fraction is not None:
        raise VerifilyError(None, "--budget-steps", "give --budget-steps or --budget-fraction, not both")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise VerifilyError(None, "--budget-fraction", f"must be in (0, 1]; got {fraction}")
        steps = max(1, round(parent_steps * fraction))
    if steps is not None:
        if steps < 1:
            raise VerifilyError(None, "--budget-steps", f"must be >= 1; got {steps}")
        return [f"training.max_steps={steps}"], {
            "max_steps": steps, "parent_steps": parent_steps,
            "description": f"short retrains: {steps} optimizer steps per arm from the same initialisation "
                           f"(the parent ran {parent_steps})"}
    return [], {"max_steps": None, "parent_steps": parent_steps,
                "description": "full retrains with the parent's config (arms without rows take fewer steps per epoch)"}


def _ablation_main(job: str) -> int:
    """One ablation run in this process: ``python -m verifily_train.flows.attribute JOB_JSON``."""
    import warnings

    warnings.filterwarnings("ignore")
    from verifily_train.flows.train import train

    spec = json.loads(job)
    summary = train(config=spec["config"], overrides=spec["overrides"], runs_dir=spec["runs_dir"])
    print(json.dumps({"path": summary["path"], "run_id": summary["run_id"]}))
    return 0


if __name__ == "__main__":
    sys.exit(_ablation_main(sys.argv[1]))
