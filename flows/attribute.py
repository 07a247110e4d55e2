"""The ``attribute`` flow (deployment ``attribute/by-tag``): leave-one-value-out retraining, fanned out.

Arms: the full data, each value removed, and per removed size a control removing as many random rows
(a fresh draw per seed), each at every seed. Each ablation run (an arm and a seed) is one task run. Locally it trains in its own process (a
``train`` flow run of its own, reporting to the same Prefect API), so runs proceed in parallel and
no two share a global RNG; ``concurrency`` bounds how many run at once. With ``deployment`` set, each
arm is submitted to that training deployment instead, so the work pool behind it (several workers,
a Docker or Kubernetes pool) spreads them; results must land on storage this flow can read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from verifily_train import attribution
from verifily_train.attribution.options import check_options
from verifily_train.attribution.plan import describe_plan, make_plan
from verifily_train.attribution.stats import DEFAULT_CONTROLS, DEFAULT_SEEDS
from verifily_train.quiet import QUIET_ENV

ABLATION_WORKER = "verifily_train.flows.ablation_worker"  # python -m ABLATION_WORKER JOB_JSON: one ablation run

# The ablation workers this process runs now. A SIGINT stops them at once (``stopping_workers_on_interrupt``):
# the flow's task threads wait for their worker, so Ctrl-C waited 22-30 s for runs nobody would read.
_WORKERS: set = set()
_WORKERS_LOCK = threading.Lock()
_STOPPING = threading.Event()
WORKER_GRACE_SECONDS = 5.0  # from SIGTERM to SIGKILL for a worker that does not end


def stop_workers() -> None:
    """Terminate every ablation worker of this process, and start no more (a retry included)."""
    _STOPPING.set()
    with _WORKERS_LOCK:
        procs = list(_WORKERS)
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.terminate()

    def kill_stragglers():
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()

    if procs:
        timer = threading.Timer(WORKER_GRACE_SECONDS, kill_stragglers)
        timer.daemon = True
        timer.start()


@contextlib.contextmanager
def stopping_workers_on_interrupt():
    """While an ``attribute`` flow runs in this (main) thread: SIGINT terminates its ablation workers, then
    interrupts as before (``KeyboardInterrupt``, exit 130), so the flow's end waits for no training run."""
    _STOPPING.clear()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return

    def on_sigint(signum, frame):
        stop_workers()
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _STOPPING.clear()  # the flow has ended: a later one in this process starts its workers


@task(name="derive-dataset", cache_policy=NO_CACHE, persist_result=False)
def derive(parent_cfg, by: str, value: str) -> dict:
    """The parent's dataset without the train rows tagged ``by: value`` (a store version; reused if present)."""
    from verifily_train.dataset.store import load_for_config

    dv = load_for_config(parent_cfg.dataset_version, parent_cfg.data_paths, parent_cfg.task)
    return attribution.derive_without(dv, by, value)


@task(name="derive-random-control", cache_policy=NO_CACHE, persist_result=False,
      task_run_name="derive-random-{rows}-seed{seed}-draw{draw}")
def derive_control(parent_cfg, rows: int, seed: int, draw: int = 0) -> dict:
    """The parent's dataset without ``rows`` random train rows (control ``draw`` of one seed, size-matched)."""
    from verifily_train.dataset.store import load_for_config

    dv = load_for_config(parent_cfg.dataset_version, parent_cfg.data_paths, parent_cfg.task)
    return attribution.derive_random(dv, rows, seed, draw=draw)


@task(name="ablation-run", cache_policy=NO_CACHE, persist_result=False, retries=1,
      task_run_name="ablation-{arm}-seed{seed}")
def ablation_run(arm: str, seed: int, config: str, overrides: List[str], runs_dir: str, api_url: str,
                 deployment: Optional[str] = None) -> str:
    """Train one arm with one seed; returns the Run folder (the train flow's cached stages are reused)."""
    if deployment:
        return _via_deployment(deployment, config, overrides, runs_dir)
    job = json.dumps({"config": config, "overrides": overrides, "runs_dir": runs_dir})
    env = dict(os.environ, PREFECT_API_URL=api_url, **QUIET_ENV)  # its stderr's last line is the error we report
    done = _run_worker([sys.executable, "-m", ABLATION_WORKER, job], env, f"ablation {arm} seed {seed}")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = [ln for ln in done.stderr.splitlines() if ln.strip()][-1:] or [f"exit {done.returncode}"]
        raise RuntimeError(f"ablation {arm} seed {seed} failed: {tail[0]}")
    return json.loads(lines[-1])["path"]


def _run_worker(command: List[str], env: dict, what: str) -> subprocess.CompletedProcess:
    """``command`` in a child process this process can stop (``stop_workers``); its output, as ``run`` gives it."""
    if _STOPPING.is_set():
        raise RuntimeError(f"{what}: interrupted")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with _WORKERS_LOCK:
        _WORKERS.add(proc)
    try:
        if _STOPPING.is_set():  # interrupted while it started
            proc.terminate()
        out, err = proc.communicate()
    finally:
        with _WORKERS_LOCK:
            _WORKERS.discard(proc)
    if _STOPPING.is_set():
        raise RuntimeError(f"{what}: interrupted")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _via_deployment(deployment: str, config: str, overrides: List[str], runs_dir: str) -> str:
    from prefect.deployments import run_deployment

    from verifily_train.config.parse import read_yaml

    run = run_deployment(deployment, parameters={"config": read_yaml(Path(config)), "overrides": overrides,
                                                 "runs_dir": runs_dir}, as_subflow=True)
    if not run.state.is_completed():
        raise RuntimeError(f"ablation run {run.name} ended {run.state.name}: {run.state.message}")
    return run.state.result()["path"]


@task(name="attribution-analysis", cache_policy=NO_CACHE, persist_result=False)
def analyze(task_name: str, by: str, arms: dict, plan: dict, target: str, split: str, alpha: float,
            correction: str, bootstrap_samples: int, at_steps: Optional[int]) -> dict:
    tables = {arm: [attribution.per_example(Path(p), task_name) for p in paths] for arm, paths in arms.items()}
    scores = ({arm: [attribution.target_score(Path(p), target) for p in paths] for arm, paths in arms.items()}
              if target == "gold" else None)
    return attribution.analyze(task_name, by, tables, plan, target=target, alpha=alpha, correction=correction,
                               bootstrap_samples=bootstrap_samples, split=split, target_scores=scores,
                               at_steps=at_steps)


@flow(name="attribute", log_prints=False, validate_parameters=False)
def attribute(run: str, by: str = "source", values: Optional[List[str]] = None, seeds: int = DEFAULT_SEEDS,
              budget_steps: Optional[int] = None, budget_fraction: Optional[float] = None, concurrency: int = 2,
              out_dir: Optional[str] = None, deployment: Optional[str] = None, bootstrap_samples: int = 1000,
              alpha: float = 0.05, correction: str = "holm", target: Optional[str] = None,
              controls: int = DEFAULT_CONTROLS) -> dict:
    """Retrain the parent run without each value of tag ``by``, without as many random rows (``controls``
    fresh draws per seed), and with all data, ``seeds`` times each; verdicts on ``target`` (default: the gold set, else the evaluated split) from
    the one-draw test, corrected over the values."""
    from prefect.artifacts import create_table_artifact
    from prefect.client.orchestration import get_client

    from verifily_train.artifacts.run import find_run, load_run_json, utc_now
    from verifily_train.config import load_config
    from verifily_train.fsio import atomic_write_json

    logger = get_run_logger()
    parent = find_run(run)
    check_options(seeds, alpha, correction, budget_steps, budget_fraction, controls=controls)  # a deployment run has no CLI
    planned = make_plan(parent, by, values, seeds, target, budget_steps, budget_fraction, controls)
    record = load_run_json(parent)
    parent_config = str(parent / "config.yaml")
    cfg = load_config(parent_config)
    chosen, notes, overrides, budget = list(planned["values"]), planned["notes"], planned["overrides"], planned["budget"]
    for note in notes:
        logger.warning(note)
    logger.info(describe_plan(planned))
    out = Path(out_dir) if out_dir else parent.parent.parent / "attributions" / f"{parent.name}-by-{by}"
    runs_dir = str((out / "runs").resolve())
    derived = {v: f.result() for v, f in zip(chosen, [derive.submit(cfg, by, v) for v in chosen])}
    sizes = sorted({d["removed_rows"] for d in derived.values()})
    draws = [(n, i, k) for n in sizes for i in range(seeds) for k in range(controls)]
    drawn = {key: f.result() for key, f in zip(draws, [derive_control.submit(cfg, n, cfg.seed + i, k)
                                                       for n, i, k in draws])}
    api_url = str(get_client().api_url).rstrip("/")

    def data(ref: str) -> List[str]:
        return [f"dataset_version={ref}", "data_paths.train=null", "data_paths.val=null", "data_paths.test=null"]

    jobs = []
    for s in range(seeds):
        seed_overrides = overrides + [f"seed={cfg.seed + s}"]
        jobs.append((attribution.FULL, s, seed_overrides))
        jobs += [(v, s, seed_overrides + data(derived[v]["ref"])) for v in chosen]
        jobs += [(attribution.control_arm(n, k), s, seed_overrides + data(drawn[(n, s, k)]["ref"]))
                 for n in sizes for k in range(controls)]
    arm_names = [attribution.FULL] + chosen + [a for n in sizes for a in attribution.control_arms(n, controls)]
    logger.info(f"{len(jobs)} ablation runs ({len(arm_names)} arms: full, {len(chosen)} value(s), {controls} x "
                f"{len(sizes)} size-matched random control(s); x {seeds} seeds), at most {concurrency} at once")
    arms: dict = {arm: [None] * seeds for arm in arm_names}
    pending, active = list(jobs), {}
    while pending or active:
        while pending and len(active) < max(1, concurrency):
            arm, index, extra = pending.pop(0)
            future = ablation_run.submit(arm, cfg.seed + index, parent_config, extra, runs_dir, api_url, deployment)
            active[future] = (arm, index)
        finished = next(as_completed(list(active)))
        arm, index = active.pop(finished)
        arms[arm][index] = finished.result()
    plan = {v: {"removed_rows": derived[v]["removed_rows"], "kept_rows": derived[v]["kept_rows"],
                "derived_dataset": derived[v]["ref"], "control": attribution.control_arm(derived[v]["removed_rows"]),
                "controls": attribution.control_arms(derived[v]["removed_rows"], controls)}
            for v in chosen}
    result = analyze(cfg.task, by, arms, plan, planned["target"], record["evaluation"]["split"], alpha, correction,
                     bootstrap_samples, budget["max_steps"])
    result.update(parent_run=str(parent), parent_dataset=record["job"]["dataset_version"].get("ref"),
                  budget=budget, concurrency=concurrency, created_at=utc_now(), notes=notes,
                  cost={"training_runs": planned["training_runs"], "reused_runs": planned["reused_runs"],
                        "arms": planned["arms"]},
                  arms={k: [str(p) for p in v] for k, v in arms.items()}, derived=derived,
                  controls={f"{n}/seed{cfg.seed + i}" + (f"/draw{k}" if k else ""): c for (n, i, k), c in drawn.items()},
                  controls_per_seed=controls)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "attribution.json", result)
    (out / "attribution.html").write_text(attribution.render_html(result), encoding="utf-8")
    metric = result["primary_metric"]
    rows = []
    for v, e in result["values"].items():
        cell = e["slices"][e["verdict_slice"]][metric]
        rows.append({"removed": f"{by}={v}", "rows_removed": e["removed_rows"], "verdict": e["verdict"],
                     "target": result["target"]["words"],
                     f"delta_{metric}_vs_random_removal": round(cell["effect"], 4), "ci95": cell["ci95"],
                     "in_random_subset_spreads": cell["in_spreads"],
                     f"p_{correction}": e["p_adjusted"], "detectable_effect": cell["mde"],
                     "removal_vs_full": round(cell["removal_effect"], 4),
                     "random_removal_vs_full": round(cell["random_removal_effect"], 4)})
    create_table_artifact(rows, key="attribution",
                          description=f"Causal attribution by retraining, by {by} ({budget['description']}); "
                                      f"{result['method']}")
    return dict(result, path=str(out))
