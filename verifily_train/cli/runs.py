"""``verifily runs list|show|verify`` and ``verifily compare``: reading Run artifacts (never writing them)."""

from __future__ import annotations

import json
import sys

from verifily_train.artifacts.run import (find_run, integrity_root, list_runs, load_run_json, runs_dirs,
                                          verify_before_use, verify_run)
from verifily_train.artifacts.trackers import check_result_tracker, log_comparison
from verifily_train.cli.console import print_table
from verifily_train.cli.summary import print_summary, summary_from_run
from verifily_train.errors import ConfigError, RunError
from verifily_train.fsio import check_output_file

MAX_RESAMPLES = 100_000  # compare's --bootstrap-samples and --permutations (defaults 1,000 and 9,999)


def cmd_runs_list(args) -> int:
    runs = list_runs(args.runs_dir)
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print(f"no runs in {' or '.join(str(d) for d in runs_dirs(args.runs_dir))}")
        return 0
    print_table([[r["run_id"], r["status"], r["task"], r["base_model"], r["dataset"], r["headline"]] for r in runs],
                ["RUN", "STATUS", "TASK", "MODEL", "DATASET", "METRIC"])
    return 0


def cmd_runs_show(args) -> int:
    path = find_run(args.run, args.runs_dir)
    record = load_run_json(path)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    if record.get("status") == "completed":
        import io

        text = io.StringIO()
        try:
            print_summary(summary_from_run(str(path)), out=text)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # a hand-edited or damaged Run
            print(f"warning: {path}: no summary ({type(err).__name__}: {err}); verifily runs verify {args.run} "
                  "says what changed", file=sys.stderr)
        else:
            print(text.getvalue().lstrip("\n"), end="")
            return 0
    print_short_record(record, path, args.run)
    return 0


def print_short_record(record: dict, path, ref: str) -> None:
    """A run that is not a complete Run (failed, damaged): what ran, and why it failed."""
    def field(value, key):
        return value.get(key) if isinstance(value, dict) else None

    error = field(record, "error")
    dataset = field(field(field(record, "job"), "dataset_version"), "ref") or "?"
    print(f"Run {record.get('run_id', path.name)}: {record.get('status')} ({dataset}, started "
          f"{record.get('started_at', '?')})")
    if error:
        print(f"  error: {field(error, 'type') or '?'}: {field(error, 'message') or ''}")
    print(f"  run: {path}\n  every field: verifily runs show {ref} --json")


def cmd_runs_verify(args) -> int:
    from verifily_train.artifacts.groups import find_group

    path = find_group(args.run, args.runs_dir) or find_run(args.run, args.runs_dir)  # a run group verifies alike
    n = verify_run(path, expected_root=args.root)
    where = "the root given" if args.root else "the ledger's root"
    print(f"ok {path}: {n} files match checksums.sha256, which matches {where} "
          f"({integrity_root(path / 'checksums.sha256')})")
    return 0


def group_sides(args):
    """The two sides of a seed-level comparison (``--a``/``--b`` run lists, or two group ids), or None for two
    single runs."""
    from verifily_train.artifacts.groups import find_group, resolve_side

    if args.group_a or args.group_b:
        if not (args.group_a and args.group_b) or args.run_a or args.run_b:
            raise ConfigError("verifily compare", "--a/--b", "give both --a RUN,RUN,.. and --b RUN,RUN,.. (and no "
                                                             "positional runs)")
        return tuple(resolve_side([r.strip() for r in refs.split(",") if r.strip()], args.runs_dir, flag)
                     for refs, flag in ((args.group_a, "--a"), (args.group_b, "--b")))
    if not (args.run_a and args.run_b):
        raise ConfigError("verifily compare", "A B", "give two runs or two run groups (or --a RUN,.. --b RUN,..)")
    found = [find_group(ref, args.runs_dir) for ref in (args.run_a, args.run_b)]
    if all(found):
        return tuple(resolve_side([ref], args.runs_dir, flag) for ref, flag in ((args.run_a, "A"), (args.run_b, "B")))
    if any(found):
        raise ConfigError("verifily compare", "A B", "compares two runs or two run groups, not a group with a run")
    return None


def cmd_compare(args) -> int:
    from verifily_train.artifacts.compare import compare_runs, render_comparison

    for flag, value, low in (("--bootstrap-samples", args.bootstrap_samples, 0), ("--permutations", args.permutations, 1)):
        if not low <= value <= MAX_RESAMPLES:  # 1,000,000,000 grew 200 MB/s; -1 was taken
            raise ConfigError(None, flag, f"must be an integer from {low} to {MAX_RESAMPLES:,}; got {value:,}")
    if args.html:
        check_output_file(args.html, "--html")  # before any work: a link, FIFO or folder there is refused
    report_to = getattr(args, "report_to", None)
    if report_to:
        check_result_tracker(report_to)
    groups = group_sides(args)
    if groups is not None and report_to:
        raise ConfigError(None, "--report-to", "logs a comparison of two runs; run groups are not logged yet")
    if groups is not None:
        from verifily_train.artifacts.groups import compare_groups, render_group_comparison, render_group_markdown

        result = compare_groups(*groups, fdr_q=args.fdr_q)
        if args.html:
            from verifily_train.artifacts.report import write_compare_report

            write_compare_report(result, args.html)
        print(json.dumps(result, indent=2, default=str) if args.json else
              render_group_markdown(result) if args.markdown else render_group_comparison(result))
        if args.html:
            print(f"wrote {args.html}", file=sys.stderr)
        return 0
    run_a, run_b = find_run(args.run_a, args.runs_dir), find_run(args.run_b, args.runs_dir)
    for run in (run_a, run_b):  # a failed run has no predictions: pairing it would claim "0 shared rows"
        status = load_run_json(run).get("status")
        if status != "completed":
            raise RunError(run, None, f"status is {status!r}; only completed runs can be compared")
        verify_before_use(run, "compare")  # a tampered Run is refused, not compared
    result = compare_runs(run_a, run_b,
                          bootstrap_samples=args.bootstrap_samples, fdr_q=args.fdr_q, permutations=args.permutations)
    if args.html:
        from verifily_train.artifacts.report import write_compare_report

        write_compare_report(result, args.html)
    print(json.dumps(result, indent=2) if args.json else render_comparison(result, markdown=args.markdown))
    if args.html:
        print(f"wrote {args.html}", file=sys.stderr)
    if report_to:
        print(f"logged to MLflow run {log_comparison(result, render_comparison(result))}", file=sys.stderr)
    return 0
