"""The ``attribute`` flow (deployment ``attribute/by-tag``): leave-one-value-out retraining, fanned out.

The work is ``attribution/orchestrate.attribute`` (plan, derive, train the arms, analyse, publish); this flow
gives it a runner whose steps are Prefect task runs. Each ablation run (an arm and a seed) is one task run.
Locally it trains in its own process (a ``train`` flow run of its own, reporting to the same Prefect API;
``attribution/workers.py``), so runs proceed in parallel and no two share a global RNG; ``concurrency``
bounds how many run at once. With ``deployment`` set, each arm is submitted to that training deployment
instead, so the work pool behind it spreads them; results must land on storage this flow can read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.futures import as_completed

from verifily_train.attribution import orchestrate
from verifily_train.attribution.options import AttributeOptions
from verifily_train.attribution.stats import DEFAULT_CONTROLS, DEFAULT_SEEDS
from verifily_train.attribution.workers import run_worker
from verifily_train.config import load_config
from verifily_train.config.parse import read_yaml
from verifily_train.errors import VerifilyError
from verifily_train.pipeline.runner import replay_run
from verifily_train.quiet import QUIET_ENV

ABLATION_WORKER = "verifily_train.flows.ablation_worker"  # one ablation run in its own process

derive = task(name="derive-dataset", cache_policy=NO_CACHE, persist_result=False)(orchestrate.derive_value)
derive_control = task(name="derive-random-control", cache_policy=NO_CACHE, persist_result=False,
                      task_run_name="derive-random-{rows}-seed{seed}-draw{draw}")(orchestrate.derive_control)
analyze = task(name="attribution-analysis", cache_policy=NO_CACHE, persist_result=False)(orchestrate.analyze_arms)


@task(name="ablation-run", cache_policy=NO_CACHE, persist_result=False, retries=1,
      task_run_name="ablation-{arm}-seed{seed}")
def ablation_run(arm: str, seed: int, config: str, overrides: List[str], runs_dir: str, api_url: str,
                 deployment: Optional[str] = None) -> str:
    """Train one arm with one seed; returns the Run folder (the train flow's cached stages are reused)."""
    if deployment:
        return _via_deployment(deployment, config, overrides, runs_dir)
    replayed = _replayed(config, overrides, runs_dir)
    if replayed is not None:
        return replayed
    env = dict(os.environ, PREFECT_API_URL=api_url, **QUIET_ENV)  # its stderr's last line is the error we report
    job = {"config": config, "overrides": overrides, "runs_dir": runs_dir}
    return run_worker(ABLATION_WORKER, job, env, f"ablation {arm} seed {seed}")["path"]


def _replayed(config: str, overrides: List[str], runs_dir: str) -> Optional[str]:
    """The arm's Run from the recorded stage entries when these exact inputs completed before, as ``verifily
    train`` replays them: in this process, no worker started (a second identical call re-spawned every arm)."""
    try:
        cfg = load_config(config, overrides)
    except VerifilyError:  # the worker's train flow reports it, with its own message
        return None
    summary = replay_run(cfg, Path(runs_dir))
    return summary["path"] if summary else None


def _via_deployment(deployment: str, config: str, overrides: List[str], runs_dir: str) -> str:
    run = run_deployment(deployment, parameters={"config": read_yaml(Path(config)), "overrides": overrides,
                                                 "runs_dir": runs_dir}, as_subflow=True)
    if not run.state.is_completed():
        raise RuntimeError(f"ablation run {run.name} ended {run.state.name}: {run.state.message}")
    return run.state.result()["path"]


class TaskRunner(orchestrate.Runner):
    """The orchestration's steps as Prefect task runs of this flow run (submitted, awaited with ``as_completed``)."""

    def __init__(self, deployment: Optional[str] = None, tasks: Optional[dict] = None):
        super().__init__(log=get_run_logger())
        self.api_url = str(get_client().api_url).rstrip("/")
        self.deployment = deployment
        self.tasks = {"derive": derive, "derive_control": derive_control, "analyze": analyze, **(tasks or {})}

    def start(self, step: str, *args):
        if step == "train":
            job: orchestrate.ArmJob = args[0]
            return ablation_run.submit(job.arm, job.seed, job.config, list(job.overrides), job.runs_dir,
                                       self.api_url, self.deployment)
        return self.tasks[step].submit(*args)

    def first_done(self, handles):
        return next(as_completed(list(handles)))


@flow(name="attribute", log_prints=False, validate_parameters=False)
def attribute(run: str, by: str = "source", values: Optional[List[str]] = None, seeds: int = DEFAULT_SEEDS,
              budget_steps: Optional[int] = None, budget_fraction: Optional[float] = None, concurrency: int = 2,
              out_dir: Optional[str] = None, deployment: Optional[str] = None, bootstrap_samples: int = 1000,
              alpha: float = 0.05, correction: str = "holm", target: Optional[str] = None,
              controls: int = DEFAULT_CONTROLS) -> dict:
    """Retrain the parent run without each value of tag ``by``, without as many random rows (``controls``
    fresh draws per seed), and with all data, ``seeds`` times each; verdicts on ``target`` (default: the gold
    set, else the evaluated split) from the one-draw test, corrected over the values."""
    options = AttributeOptions(run=run, by=by, values=values, seeds=seeds, budget_steps=budget_steps,
                               budget_fraction=budget_fraction, concurrency=concurrency, out_dir=out_dir,
                               deployment=deployment, bootstrap_samples=bootstrap_samples, alpha=alpha,
                               correction=correction, target=target, controls=controls)
    result = orchestrate.attribute(options, TaskRunner(deployment))
    create_table_artifact(orchestrate.verdict_table(result), key="attribution",
                          description=f"Causal attribution by retraining, by {by} ({result['budget']['description']}); "
                                      f"{result['method']}")
    return result
