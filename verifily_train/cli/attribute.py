"""``verifily attribute``: check the flags, then run the ``attribute`` flow in-process and print the verdicts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

from verifily_train.artifacts.run import find_run, load_run_json, verify_before_use
from verifily_train.artifacts.trackers import check_result_tracker, log_attribution
from verifily_train.attribution import render
from verifily_train.attribution.options import check_options
from verifily_train.attribution.plan import describe_plan, make_plan
from verifily_train.attribution.stats import DEFAULT_CONTROLS
from verifily_train.attribution.workers import stopping_workers_on_interrupt
from verifily_train.cli import rows
from verifily_train.errors import VerifilyError
from verifily_train.cli.runtime import await_server, in_process_flow_settings, start_quiet_server, use_prefect_server


def cmd_attribute(args) -> int:
    report_to = getattr(args, "report_to", None)
    if args.rows:
        if report_to:
            raise VerifilyError(None, "--report-to", "logs tag verdicts; --rows scores are not logged yet")
        return rows.cmd_attribute_rows(args)
    check_result_tracker(report_to)
    parent = find_run(args.run, getattr(args, "runs_dir", None))  # a wrong id fails here, before Prefect starts
    values = split_values(args.values)
    controls = getattr(args, "controls", None)
    plan = checked_plan(parent.resolve(), args.by, values, args.seeds, args.target, args.alpha, args.correction,
                        args.budget_steps, args.budget_fraction, args.concurrency, controls)
    if args.dry_run:
        print(json.dumps(plan, indent=2) if args.json else describe_plan(plan))
        return 0
    if not args.json:
        print(describe_plan(plan), flush=True)
    use_prefect_server()
    return run_attribute(str(parent.resolve()), args.by, values, args.seeds, args.budget_steps,
                         args.budget_fraction, args.concurrency, args.out, args.deployment, args.json, args.alpha,
                         args.correction, plan["target"], report_to, plan["controls"])


def checked_plan(parent: Path, by: str, values: Optional[List[str]], seeds: int, target: Optional[str], alpha: float,
                 correction: str, budget_steps, budget_fraction, concurrency: int,
                 controls: Optional[int] = None) -> dict:
    """The Run verified, the options checked and the plan made: each problem is one line, before any run
    (``verifily attribute`` and ``verifily_train.attribute`` alike)."""
    verify_before_use(parent, "attribute")
    controls = DEFAULT_CONTROLS if controls is None else controls
    check_options(seeds, alpha, correction, budget_steps, budget_fraction, concurrency, controls)
    return make_plan(parent, by, values, seeds, target, budget_steps, budget_fraction, controls)


def split_values(values: Optional[str]) -> Optional[List[str]]:
    """``--values a,b`` as a list; None (every value of the tag) when not given."""
    return [v for v in values.split(",") if v] if values else None


def run_attribute(run: str, by: str, values, seeds: int, budget_steps, budget_fraction, concurrency: int,
                  out_dir, deployment, as_json: bool, alpha: float = 0.05, correction: str = "holm",
                  target: Optional[str] = None, report_to: Optional[str] = None,
                  controls: Optional[int] = None) -> int:
    """Run the ``attribute`` flow in this process (its ablation runs in child processes) and print the verdicts."""
    result = attribution_result(run, by, values, seeds, budget_steps, budget_fraction, concurrency, out_dir,
                                deployment, alpha, correction, target, controls)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
        print(f"\n  attribution: {result['path']}/attribution.json  (report: attribution.html)")
    if report_to:
        parent_id = str(load_run_json(Path(run)).get("run_id", Path(run).name))
        print(f"  logged to MLflow run {log_attribution(result, parent_id)}", file=sys.stderr)
    return 0


def attribution_result(run: str, by: str, values, seeds: int, budget_steps, budget_fraction, concurrency: int,
                       out_dir, deployment, alpha: float = 0.05, correction: str = "holm",
                       target: Optional[str] = None, controls: Optional[int] = None) -> dict:
    """The ``attribute`` flow run in this process (its ablation runs in child processes): attribution.json's dict."""
    use_prefect_server()
    server = start_quiet_server()
    from verifily_train.flows.attribute import attribute

    await_server(server)
    with in_process_flow_settings(), stopping_workers_on_interrupt():  # Ctrl-C: its workers end at once
        return attribute(run=run, by=by, values=values, seeds=seeds, budget_steps=budget_steps,
                         budget_fraction=budget_fraction, concurrency=concurrency, out_dir=out_dir,
                         deployment=deployment, alpha=alpha, correction=correction, target=target,
                         controls=DEFAULT_CONTROLS if controls is None else controls)
