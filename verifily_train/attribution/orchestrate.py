"""A tag-level attribution from plan to published outputs, with no Prefect: plan, check, derive the arms'
datasets, train every arm through an injected :class:`Runner`, analyse, write.

The ``attribute`` flow (``flows/attribute.py``) is this with a runner whose steps are Prefect task runs; a
script or a test passes :class:`Runner` with a function that trains one arm (``train_arm(job) -> Run folder``).
:func:`run_bounded` is the one bounded-concurrency loop (arms here, ``--verify``'s arms and the gradient
shards of ``--rows``).
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from verifily_train.artifacts.run import find_run, load_run_json, utc_now
from verifily_train.attribution.analysis import FULL, analyze, control_arm, control_arms, per_example, target_score
from verifily_train.attribution.derive import derive_random, derive_without
from verifily_train.attribution.options import AttributeOptions
from verifily_train.attribution.output import publish_outputs
from verifily_train.attribution.plan import describe_plan, make_plan
from verifily_train.attribution.render import render_html
from verifily_train.config import TrainConfig, load_config
from verifily_train.dataset.store import load_for_config


@dataclass(frozen=True)
class ArmJob:
    """One ablation run: an arm at one seed, as the parent's config with overrides."""

    arm: str
    seed: int
    config: str  # the parent's train.yaml
    overrides: Tuple[str, ...]
    runs_dir: str


def derive_value(parent_cfg: TrainConfig, by: str, value: str) -> dict:
    """The parent's dataset without the train rows tagged ``by: value`` (a store version; reused if present)."""
    dv = load_for_config(parent_cfg.dataset_version, parent_cfg.data_paths, parent_cfg.task)
    return derive_without(dv, by, value)


def derive_control(parent_cfg: TrainConfig, rows: int, seed: int, draw: int = 0) -> dict:
    """The parent's dataset without ``rows`` random train rows (control ``draw`` of one seed, size-matched)."""
    dv = load_for_config(parent_cfg.dataset_version, parent_cfg.data_paths, parent_cfg.task)
    return derive_random(dv, rows, seed, draw=draw)


def analyze_arms(task_name: str, by: str, arms: dict, plan: dict, target: str, split: str, alpha: float,
                 correction: str, bootstrap_samples: int, at_steps: Optional[int]) -> dict:
    """The verdicts from every arm's Run folders (their per-example predictions)."""
    tables = {arm: [per_example(Path(p), task_name) for p in paths] for arm, paths in arms.items()}
    scores = ({arm: [target_score(Path(p), target) for p in paths] for arm, paths in arms.items()}
              if target == "gold" else None)
    return analyze(task_name, by, tables, plan, target=target, alpha=alpha, correction=correction,
                   bootstrap_samples=bootstrap_samples, split=split, target_scores=scores, at_steps=at_steps)


class Runner:
    """How an attribution runs its steps: here in this process, on threads, each arm through ``train_arm``.

    ``start(step, *args)`` returns a future of one step (``derive``, ``derive_control``, ``train``, ``analyze``,
    and the ``--rows`` steps); ``first_done`` picks a finished one; ``outcome`` reads it. The flows pass a
    subclass whose steps are Prefect task runs.
    """

    def __init__(self, train_arm: Optional[Callable[[ArmJob], str]] = None, workers: int = 8,
                 log: Optional[logging.Logger] = None, steps: Optional[Dict[str, Callable]] = None):
        self.steps = {"derive": derive_value, "derive_control": derive_control, "analyze": analyze_arms,
                      **({"train": train_arm} if train_arm else {}), **(steps or {})}
        self.log = log or logging.getLogger("verifily_train.attribution")
        self.workers = workers
        self._pool: Optional[ThreadPoolExecutor] = None

    def start(self, step: str, *args) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="attribution")
        return self._pool.submit(self.steps[step], *args)

    def first_done(self, handles: List[Future]) -> Future:
        return next(iter(wait(handles, return_when=FIRST_COMPLETED).done))

    def outcome(self, handle: Future):
        return handle.result()

    def call(self, step: str, *args):
        """One step, waited for."""
        return self.outcome(self.start(step, *args))


def run_bounded(runner: Runner, calls: Sequence[Tuple], concurrency: int) -> list:
    """Each ``(step, *args)`` of ``calls`` started through ``runner``, at most ``concurrency`` at once (the next
    starts as any one ends); their outcomes in the order of ``calls``."""
    results: list = [None] * len(calls)
    pending, active = list(enumerate(calls)), {}
    while pending or active:
        while pending and len(active) < max(1, concurrency):
            index, (step, *args) = pending.pop(0)
            active[runner.start(step, *args)] = index
        finished = runner.first_done(list(active))
        results[active.pop(finished)] = runner.outcome(finished)
    return results


def run_arms(runner: Runner, jobs: Sequence[Tuple[str, int, ArmJob]], seeds: int, concurrency: int,
             arm_names: Sequence[str]) -> Dict[str, List[str]]:
    """Every ``(arm, seed index, job)`` trained, ``concurrency`` at once: per arm, its Run folders by seed index."""
    paths = run_bounded(runner, [("train", job) for _, _, job in jobs], concurrency)
    arms: Dict[str, List[Optional[str]]] = {arm: [None] * seeds for arm in arm_names}
    for (arm, index, _), path in zip(jobs, paths):
        arms[arm][index] = path
    return arms


def dataset_overrides(ref: str) -> List[str]:
    """Overrides that train the parent's config on the store version ``ref`` instead of its own data."""
    return [f"dataset_version={ref}", "data_paths.train=null", "data_paths.val=null", "data_paths.test=null"]


def attribute(options: AttributeOptions, runner: Runner) -> dict:
    """Retrain the parent run without each value of tag ``by``, without as many random rows (``controls`` fresh
    draws per seed), and with all data, ``seeds`` times each; verdicts on the target from the one-draw test,
    corrected over the values. Writes the attribution folder; returns attribution.json's content with ``path``."""
    o, log = options, runner.log
    parent = find_run(o.run)
    o.check()  # a deployment run has no CLI
    values = list(o.values) if o.values is not None else None
    planned = make_plan(parent, o.by, values, o.seeds, o.target, o.budget_steps, o.budget_fraction, o.controls)
    record = load_run_json(parent)
    parent_config = str(parent / "config.yaml")
    cfg = load_config(parent_config)
    chosen, notes, overrides, budget = list(planned["values"]), planned["notes"], planned["overrides"], planned["budget"]
    for note in notes:
        log.warning(note)
    log.info(describe_plan(planned))
    out = Path(o.out_dir) if o.out_dir else parent.parent.parent / "attributions" / f"{parent.name}-by-{o.by}"
    runs_dir = str((out / "runs").resolve())
    derived = dict(zip(chosen, run_bounded(runner, [("derive", cfg, o.by, v) for v in chosen], len(chosen))))
    sizes = sorted({d["removed_rows"] for d in derived.values()})
    draws = [(n, i, k) for n in sizes for i in range(o.seeds) for k in range(o.controls)]
    drawn = dict(zip(draws, run_bounded(runner, [("derive_control", cfg, n, cfg.seed + i, k) for n, i, k in draws],
                                        len(draws))))
    jobs = []
    for s in range(o.seeds):
        seed_overrides = overrides + [f"seed={cfg.seed + s}"]

        def job(arm: str, extra: List[str]) -> Tuple[str, int, ArmJob]:
            return arm, s, ArmJob(arm, cfg.seed + s, parent_config, tuple(seed_overrides + extra), runs_dir)

        jobs.append(job(FULL, []))
        jobs += [job(v, dataset_overrides(derived[v]["ref"])) for v in chosen]
        jobs += [job(control_arm(n, k), dataset_overrides(drawn[(n, s, k)]["ref"]))
                 for n in sizes for k in range(o.controls)]
    arm_names = [FULL] + chosen + [a for n in sizes for a in control_arms(n, o.controls)]
    log.info(f"{len(jobs)} ablation runs ({len(arm_names)} arms: full, {len(chosen)} value(s), {o.controls} x "
             f"{len(sizes)} size-matched random control(s); x {o.seeds} seeds), at most {o.concurrency} at once")
    arms = run_arms(runner, jobs, o.seeds, o.concurrency, arm_names)
    plan = {v: {"removed_rows": derived[v]["removed_rows"], "kept_rows": derived[v]["kept_rows"],
                "derived_dataset": derived[v]["ref"], "control": control_arm(derived[v]["removed_rows"]),
                "controls": control_arms(derived[v]["removed_rows"], o.controls)}
            for v in chosen}
    result = runner.call("analyze", cfg.task, o.by, arms, plan, planned["target"], record["evaluation"]["split"],
                         o.alpha, o.correction, o.bootstrap_samples, budget["max_steps"])
    result.update(parent_run=str(parent), parent_dataset=record["job"]["dataset_version"].get("ref"),
                  budget=budget, concurrency=o.concurrency, created_at=utc_now(), notes=notes,
                  cost={"training_runs": planned["training_runs"], "reused_runs": planned["reused_runs"],
                        "arms": planned["arms"]},
                  arms={k: [str(p) for p in v] for k, v in arms.items()}, derived=derived,
                  controls={f"{n}/seed{cfg.seed + i}" + (f"/draw{k}" if k else ""): c for (n, i, k), c in drawn.items()},
                  controls_per_seed=o.controls)
    publish_outputs(out, result, render_html(result))
    return dict(result, path=str(out))


def verdict_table(result: dict) -> List[dict]:
    """One row per value: its verdict, effect against random removal and interval (the flow's table artifact)."""
    metric, by, correction = result["primary_metric"], result["by"], result["correction"]
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
    return rows
