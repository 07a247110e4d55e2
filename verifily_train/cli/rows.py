"""``verifily attribute RUN --rows`` and ``verifily dataset derive RUN --drop-top K | --drop-rows FILE``.

Argument checks that need no model come first; the plan (which reads the Run and its cached rows) is made
before Prefect starts, so a bad target, an unknown slice or a run without snapshots is one line, exit 2,
with nothing written. Their flags are declared in ``cli/parser.py``: ``verifily --help`` never imports this module.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from verifily_train.artifacts.run import find_run, load_run_json, verify_before_use
from verifily_train.attribution.derive_rows import derive_without_rows, read_row_list, resolve_rows, rows_digest
from verifily_train.attribution.output import load_attribution
from verifily_train.attribution.row_verify import check_selection, check_verify, top_row_hashes, verify_method
from verifily_train.attribution.rows import RESULT_FILE
from verifily_train.attribution.workers import stopping_workers_on_interrupt
from verifily_train.cli.runtime import (await_server, in_process_flow_settings, start_quiet_server,
                                        start_temporary_server, use_prefect_server)
from verifily_train.config import load_config
from verifily_train.dataset.store import load_for_config
from verifily_train.errors import VerifilyError
from verifily_train.pipeline.row_attribution import DEFAULT_PROJECTION_DIM, plan_for_call, shard_count
from verifily_train.pipeline.row_output import default_parent, existing


MAX_PROJECTION_DIM = 16384  # rows x dims x 4 bytes per checkpoint: 2,000,000,000 tried to allocate 16 GB


def _check_numbers(args) -> None:
    for name in ("checkpoints", "projection_dim"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "checkpoints" else 0):
            flag = "--" + name.replace("_", "-")
            raise VerifilyError(None, flag, f"must be >= {1 if name == 'checkpoints' else 0}; got {value}")
    if args.projection_dim is not None and args.projection_dim > MAX_PROJECTION_DIM:
        raise VerifilyError(None, "--projection-dim", f"must be at most {MAX_PROJECTION_DIM:,} (0 = exact gradients); "
                                                      f"got {args.projection_dim:,}")
    if args.methods is not None and not [m for m in args.methods.split(",") if m.strip()]:
        raise VerifilyError(None, "--methods", f"names no method; got {args.methods!r} (comma-separated names, or all)")
    if args.shards < 1:
        raise VerifilyError(None, "--shards", f"must be >= 1; got {args.shards}")
    if args.verify < 0:
        raise VerifilyError(None, "--verify", f"must be >= 1 rows; got {args.verify}")
    if args.top < 1:
        raise VerifilyError(None, "--top", f"must be >= 1; got {args.top}")
    if args.concurrency < 1:
        raise VerifilyError(None, "--concurrency", f"must be >= 1; got {args.concurrency}")


def cmd_attribute_rows(args) -> int:
    """``verifily attribute RUN --rows``: run the flow in this process and print the top rows and tag sums."""
    started = time.perf_counter()
    _check_numbers(args)
    run = find_run(args.run, getattr(args, "runs_dir", None)).resolve()
    verify_before_use(run, "attribute --rows")
    projection = DEFAULT_PROJECTION_DIM if args.projection_dim is None else args.projection_dim
    use_prefect_server()
    start_quiet_server()  # it boots on the other core while the plan reads the Run, the model and the snapshots
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    target = args.target or "test"
    plan = plan_for_call(run, target, args.checkpoints, projection, 0, methods, args.verify, args.select,
                         args.same_rows)  # user errors before Prefect
    shard_count(plan, args.shards)
    if args.verify:
        if not 0 < args.alpha < 1:
            raise VerifilyError(None, "--alpha", f"must be in (0, 1); got {args.alpha}")
        problem = check_verify(args.verify, plan.train_rows, args.seeds)
        if problem:
            raise VerifilyError(None, "--verify", problem)
        check_selection(plan, target, verify_method(plan.methods, args.verify_by), args.same_rows)
    elif args.verify_by:
        raise VerifilyError(None, "--verify-by", "names the score --verify ranks by: give it with --verify K")
    return _run_flow(args, run, projection, methods, started)


def _run_flow(args, run: Path, projection: int, methods: Optional[List[str]], started: float) -> int:
    server = start_temporary_server()  # the one started before the plan (None when a server is configured)
    from verifily_train.flows.attribute_rows import attribute_rows

    await_server(server)
    with in_process_flow_settings(), stopping_workers_on_interrupt():  # Ctrl-C: --verify's workers end at once
        result = attribute_rows(run=str(run), target=args.target or "test", checkpoints=args.checkpoints, shards=args.shards,
                                projection_dim=projection, methods=methods, verify=args.verify, seeds=args.seeds,
                                budget_steps=args.budget_steps, budget_fraction=args.budget_fraction,
                                concurrency=args.concurrency, out_dir=args.out, deployment=args.deployment,
                                alpha=args.alpha, correction=args.correction, select=args.select,
                                same_rows=args.same_rows, verify_by=args.verify_by)
    whole = time.perf_counter() - started
    if args.json:
        print(json.dumps(dict(result, command_seconds=round(whole, 3)), indent=2))
    else:
        print_rows_result(result, whole, args.top)
    return 0


def _tags(tags: dict) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(tags.items()))


def _clip(text, width: int) -> str:
    """One line of at most ``width`` characters (an ellipsis where it was cut)."""
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def _table(rows: List[List[str]], header: List[str], out) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        out.write("    " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() + "\n")


def _print_family(w, out, family: str, entry: dict, result: dict, top: int) -> None:
    """One family's section: what it answers, its default score's top rows, and per tag value its point sums."""
    method = entry["default"]
    target = (f" on the {entry['target']} loss ({result['target_rows']} {entry['target_split']} rows)"
              if entry.get("target") else "")
    w(f"\n== {family.upper()}{target}: ranked by {method}\n")
    if entry.get("question"):
        w(f"  answers: {entry['question']}\n")
    w(f"  score_{method}: {entry.get('meaning', '')}\n")
    if entry.get("label_issue"):
        w(f"  label_issue is {entry['label_issue']} (cleanlab intends out-of-fold probabilities)\n")
    attribution = family == "attribution"
    sections = ((("most harmful to the target (highest score)", "most_harmful"),
                 ("most helpful to the target (lowest score)", "most_helpful")) if attribution
                else (("most suspect rows (highest score)", "most_harmful"),))
    for title, key in sections:
        w(f"\n  {title}:\n")
        _table([[r["rank"], f"{r['score']:+.4g}", r["example_id"], f"{r['file']}:{r['line']}", _tags(r["tags"]),
                 _clip(r["text"], 60), _clip(r.get("answer", r.get("reference", "")), 30)] for r in entry[key][:top]],
               ["rank", f"score_{method}", "row", "where", "tags", "text", "answer"], out)
    reading = ("> 0: worse than average rows, to first order the direction of a 'hurts' verdict" if attribution else
               "> 0: more suspect than average rows; says nothing about what removing them does")
    for tag, values in entry["by_tag"].items():
        w(f"\n  by {tag}: sum and mean of score_{method}, and the excess over average rows ({reading}); point "
          f"values from one trained model, no interval (rows of one model carry no training variance):\n")
        _table([[v["value"], v["rows"], f"{v['sum']:+.4g}", f"{v['mean']:+.4g}", f"{v['excess']:+.4g}"]
                for v in values], ["value", "rows", "sum", "mean", "excess"], out)


def print_rows_result(result: dict, command_seconds: float, top: int = 10, out=None) -> None:
    """The top rows each way, the per-tag-value sums, the cost ratio and the verification verdict."""
    out = out or sys.stdout
    w = out.write
    families = result.get("families") or {}
    w(f"\nRow scores of {Path(result['parent_run']).name}: {result['train_rows']} train rows, "
      f"{', '.join(result['methods'])} over {result['checkpoints']} checkpoint(s), {result['shards']} shard(s)\n")
    for note in result.get("notes", []):
        w(f"  note: {note}\n")
    for family, entry in families.items():
        _print_family(w, out, family, entry, result, top)
    if not families:  # an attribution folder written before the families were named
        _print_family(w, out, "scores", {"default": result["default_method"], "meaning": result.get("meaning", ""),
                                         "question": "", **{k: result[k] for k in ("most_harmful", "most_helpful",
                                                                                    "by_tag")}}, result, top)
    cost = result["cost"]
    now = result.get("stages_now") or result["stages"]
    hits = sum(1 for s in now.values() if s["cache_hit"])
    w(f"\n  stages: {hits} of {len(now)} cache hits\n")
    verification = result.get("verify")
    if cost.get("train_stage_seconds") and verification:
        w(f"  cost: the scoring flow {cost['seconds']:.1f} s = {cost['ratio']:.2f} x the run's own train stage "
          f"({cost['train_stage_seconds']:.1f} s, {cost['train_stage_source']}); this call with --verify's "
          f"retraining {command_seconds:.1f} s\n")
    elif cost.get("train_stage_seconds"):
        w(f"  cost: this call {command_seconds:.1f} s = {command_seconds / cost['train_stage_seconds']:.2f} x the "
          f"run's own train stage ({cost['train_stage_seconds']:.1f} s, {cost['train_stage_source']}); the scoring "
          f"flow when it ran: {cost['seconds']:.1f} s = {cost['ratio']:.2f} x\n")
    if verification:
        if verification.get("selection"):
            w(f"\n  verify selection: {verification['selection']['note']}")
        w(f"\n  verify --verify {verification['k']} over {verification['seeds']} seeds: {verification['summary']}\n"
          f"    per seed (top-K removed minus random removed, {verification['metric']}): "
          + ", ".join(f"{d:+.4f}" for d in verification["per_seed"]) + "\n")
    if result.get("reused"):
        w("  unchanged: this attribution folder already held these results; nothing was written\n")
    w(f"\n  attribution: {result['path']}  (row_attribution.parquet, attribution.json, report.html)\n")


def find_attribution(run: Path, given: Optional[str]) -> Path:
    """The row attribution folder to rank by: ``given``, else the newest ``--rows`` folder of ``run``."""
    if given:
        folder = Path(given)
        if existing(folder) is None or existing(folder).get("kind") != "rows":
            raise VerifilyError(folder, "--attribution", "is not a row attribution folder (attribute RUN --rows)")
        return folder
    parent = default_parent(run)
    candidates = []
    for folder in sorted(parent.glob(f"{run.name}-rows-*")) if parent.is_dir() else []:
        record = existing(folder)
        if record is not None and record.get("kind") == "rows":
            candidates.append((record.get("created_at", ""), folder))
    if not candidates:
        raise VerifilyError(None, "--drop-top", f"no row attribution of {run.name} in {parent}: run `verifily "
                                                f"attribute {run.name} --rows` first, or give --attribution DIR")
    return max(candidates)[1]


def cmd_dataset_derive(args) -> int:
    """``verifily dataset derive RUN --drop-top K | --drop-rows FILE``."""
    run = find_run(args.run, args.runs_dir).resolve()
    if load_run_json(run).get("status") != "completed":
        raise VerifilyError(run, None, "only a completed run's dataset can be derived from")
    verify_before_use(run, "dataset derive")
    cfg = load_config(str(run / "config.yaml"))
    dv = load_for_config(cfg.dataset_version, cfg.data_paths, cfg.task)
    if args.drop_rows:
        drop = resolve_rows(dv, read_row_list(Path(args.drop_rows)), args.drop_rows)
        rule = {"by": "file", "file": Path(args.drop_rows).name, "run": run.name}
        label = f"rows-{rows_digest(drop)}"
        source = args.drop_rows
    else:
        import pandas as pd

        folder = find_attribution(run, args.attribution)
        record = load_attribution(folder)  # checked against its checksums: --attribution DIR is the user's
        method = args.method or record["default_method"]
        if method not in record["methods"]:
            raise VerifilyError(None, "--method", f"{method!r} is not in {folder.name} (methods: "
                                                  f"{', '.join(record['methods'])})")
        if not 1 <= args.drop_top < record["train_rows"]:
            raise VerifilyError(None, "--drop-top", f"must be in [1, {record['train_rows'] - 1}] (the run has "
                                                    f"{record['train_rows']} train rows); got {args.drop_top}")
        table = pd.read_parquet(folder / RESULT_FILE)
        drop = set(top_row_hashes(table, method, args.drop_top))
        rule = {"by": "row_attribution", "method": method, "top": args.drop_top, "target": record["target"],
                "attribution": folder.name, "attribution_key": record["key"]}
        label = f"top-{args.drop_top}-{method}-{rows_digest(drop)}"
        source = f"{folder} ({method})"
    child = derive_without_rows(dv, drop, rule, label)
    print(f"derived {child['ref']}  {child['kept_rows']} train rows kept, {child['removed_rows']} removed "
          f"({len(drop)} row hash(es) from {source})  {child['content_hash']}")
    print(f"  derived_from: {child['parent']} (rule drop_train_rows: {rule['by']})")
    nulls = "" if not cfg.data_paths.train else " data_paths.train=null data_paths.val=null data_paths.test=null"
    print(f"  train on it: verifily train -c {run / 'config.yaml'} --dataset {child['ref']}{nulls}")
    return 0
