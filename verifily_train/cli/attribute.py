"""``verifily attribute``: check the flags, then run the ``attribute`` flow in-process and print the verdicts."""

from __future__ import annotations

import json
from typing import List, Optional

from verifily_train.attribution.options import check_options
from verifily_train.cli import rows
from verifily_train.cli.runtime import await_server, in_process_flow_settings, start_quiet_server, use_prefect_server


def cmd_attribute(args) -> int:
    if args.rows:
        return rows.cmd_attribute_rows(args)
    from verifily_train.artifacts.run import find_run, verify_before_use

    from verifily_train.attribution.plan import describe_plan, make_plan

    parent = find_run(args.run)  # a wrong id fails here, before Prefect starts
    verify_before_use(parent, "attribute")
    check_options(args.seeds, args.alpha, args.correction, args.budget_steps, args.budget_fraction, args.concurrency)
    values = split_values(args.values)
    plan = make_plan(parent.resolve(), args.by, values, args.seeds, args.target, args.budget_steps,
                     args.budget_fraction)  # a bad value, target or budget: one line, before any run
    if args.dry_run:
        print(json.dumps(plan, indent=2) if args.json else describe_plan(plan))
        return 0
    if not args.json:
        print(describe_plan(plan), flush=True)
    use_prefect_server()
    return run_attribute(str(parent.resolve()), args.by, values, args.seeds, args.budget_steps,
                         args.budget_fraction, args.concurrency, args.out, args.deployment, args.json, args.alpha,
                         args.correction, plan["target"])


def split_values(values: Optional[str]) -> Optional[List[str]]:
    """``--values a,b`` as a list; None (every value of the tag) when not given."""
    return [v for v in values.split(",") if v] if values else None


def run_attribute(run: str, by: str, values, seeds: int, budget_steps, budget_fraction, concurrency: int,
                  out_dir, deployment, as_json: bool, alpha: float = 0.05, correction: str = "holm",
                  target: Optional[str] = None) -> int:
    """Run the ``attribute`` flow in this process (its ablation runs in child processes) and print the verdicts."""
    server = start_quiet_server()
    from verifily_train.attribution import render
    from verifily_train.flows.attribute import attribute

    await_server(server)
    with in_process_flow_settings():
        result = attribute(run=run, by=by, values=values, seeds=seeds, budget_steps=budget_steps,
                           budget_fraction=budget_fraction, concurrency=concurrency, out_dir=out_dir,
                           deployment=deployment, alpha=alpha, correction=correction, target=target)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
        print(f"\n  attribution: {result['path']}/attribution.json  (report: attribution.html)")
    return 0
