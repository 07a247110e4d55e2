"""``verifily train``, ``reproduce``: validate once, replay an identical run from the cache or run the Prefect
``train`` flow in-process, and print the run summary."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from verifily_train.artifacts.reproduce import compare_reproduction, render_reproduction
from verifily_train.artifacts.run import find_run, new_run_id, verify_before_use
from verifily_train.checksums import CHECKSUMS
from verifily_train.cli.runtime import (await_server, check_api_answers, first_line, in_process_flow_settings, is_prefect_api_error,
                                        preload_fingerprint_modules, prefect_api_problem, quiet_libraries,
                                        start_quiet_server, use_prefect_server)
from verifily_train.cli.summary import print_summary, summary_from_run
from verifily_train.config import config_to_dict, load_config, load_with_problems
from verifily_train.config.parse import read_yaml
from verifily_train.config.schema import MANAGED_MESSAGE, TrainConfig
from verifily_train.errors import PreflightError, VerifilyError
from verifily_train.flows.submit import submit_and_follow
from verifily_train.pipeline.preflight import cheap_checks, model_and_device_checks


def cmd_train(args) -> int:
    # Validate before anything heavy is imported: a bad config fails in well under a second. The config is
    # read and validated here, once per process; the flow gets the resolved config as a mapping it only rebuilds.
    overrides = list(args.overrides) + (["cache.enabled=false"] if args.no_cache else [])
    if getattr(args, "seeds", None) is not None:
        overrides.append(f"training.replicates={args.seeds}")
    cfg, problems = load_with_problems(args.config, overrides, dataset=args.dataset)  # preflight reports problems
    mode = args.mode or cfg.compute.mode
    if mode == "managed":
        if problems:  # an invalid config is reported, not accepted with exit 0
            raise PreflightError(problems)
        print(MANAGED_MESSAGE)
        return 0
    if mode == "self_host":
        return submit_self_host(args, overrides)
    if cfg.compute.mode != mode:  # --mode local over a train.yaml's compute.mode: the flow must not see managed
        cfg = dataclasses.replace(cfg, compute=dataclasses.replace(cfg.compute, mode=mode))
    print_train_summary(train_summary(cfg, problems, refresh=args.refresh, flow=args.flow))
    return 0


def train_summary(cfg: TrainConfig, problems: List[VerifilyError], refresh: bool = False, flow: bool = False) -> dict:
    """Check, then replay these exact inputs from the cache or run the ``train`` flow: the Run's summary, unprinted
    (``verifily train`` and ``verifily_train.train`` alike)."""
    use_prefect_server()  # runs show in the stack's UI while one is up
    checked = cheap_checks(cfg, problems)  # every problem at once, before Prefect or a model
    if checked.hub_unreachable:
        # before anything imports huggingface_hub, which reads it then; the DDP ranks inherit it
        os.environ["HF_HUB_OFFLINE"] = "1"
    if not (refresh or flow) and cfg.training.replicates == 1:  # a group's members replay inside its flow run
        summary = replay_summary(cfg)
        if summary is not None:
            return summary  # these exact inputs ran before: a new Run from the verified cache entries, no flow run
    # the temporary Prefect server (when no server is configured) boots while the model's config is read
    start_quiet_server()
    model_and_device_checks(cfg, hub_unreachable=checked.hub_unreachable)
    return flow_summary(cfg, refresh=refresh)


def print_train_summary(summary: dict) -> None:
    """The summary, with what a replay or a failed Prefect record adds."""
    if "members" in summary:  # a replicate group (training.replicates > 1)
        print_group_summary(summary)
        return
    print_summary(summary)
    if summary.get("replayed"):
        api = os.environ.get("PREFECT_API_URL")
        print("  replayed: every stage was cached for these exact inputs, so no Prefect flow run was made "
              "(--flow makes one)" + ("; its artifacts are on the Prefect server" if api else ""))
        if summary.get("publish_failed"):
            print(f"  warning: the Prefect server did not take the Run's artifacts ({summary['publish_failed']})",
                  file=sys.stderr)
    if summary.get("prefect_failed"):
        print(f"  warning: the Run is complete, but Prefect's server could not record it ({summary['prefect_failed']})",
              file=sys.stderr)
    for warning in summary.get("tracker_warnings", []):
        print(f"  warning: {warning}", file=sys.stderr)


def print_group_summary(summary: dict) -> None:
    """Each member run's summary, then the group: its id, seeds, and how to compare it."""
    for member in summary["members"]:
        print_summary(member)
    if not summary.get("group_id"):
        print("\nrun group: every replicate was skipped (already trained under this config)")
        return
    print(f"\nRun group {summary['group_id']}: {len(summary['members'])} runs at seeds "
          f"{', '.join(map(str, summary['seeds']))}\n  path: {summary['path']}\n"
          f"  compare it with another group (seed-level tests of the change): verifily compare "
          f"{summary['group_id']} OTHER_GROUP")
    if summary.get("compared_with"):
        print(f"  compared with the previous dataset version's group: {Path(summary['compared_with']).name} "
              "(Prefect artifact 'comparison')")


def submit_self_host(args, overrides: List[str]) -> int:
    """Send the config (inline: the worker may be another machine) to the self-host pool and follow the run.

    The train.yaml goes as written, not resolved: its relative paths are the worker's to resolve.
    """
    api_url = use_prefect_server()
    if not api_url:
        raise VerifilyError(None, "--mode", "self_host submits the run to a Prefect server's self-host pool: set "
                                            "PREFECT_API_URL to it (or start one with verifily stack up)")
    check_api_answers(api_url)  # a stale URL: one line, not httpx.ConnectError
    config = read_yaml(Path(args.config)) if args.config else None
    quiet_libraries()
    return submit_and_follow({"config": config, "overrides": overrides, "dataset": args.dataset})


def replay_identical_run(cfg) -> bool:
    """Write and print a new Run from the cache when these exact inputs completed before (pipeline/replay.py)."""
    summary = replay_summary(cfg)
    if summary is None:
        return False
    print_train_summary(summary)
    return True


def replay_summary(cfg) -> Optional[dict]:
    """A new Run from the cache when these exact inputs completed before (pipeline/replay.py): its summary, or None.

    It finishes as a flow run does (pipeline/runner.py): the claim, the comparison with the previous dataset
    version's run, and the Prefect artifacts when a Prefect server is configured (none is started for it).
    """
    if not cfg.cache.enabled or cfg.output.push_to_hub:
        return None
    # imported here, not at the top: the pipeline's modules take over a second, which a bad config never waits for
    from verifily_train.cli.prefect_rest import RestPublisher
    from verifily_train.pipeline.runner import Publisher, replay_run

    api = os.environ.get("PREFECT_API_URL")
    publisher = RestPublisher(api) if api else Publisher()  # no server configured: none is started for a replay
    summary = replay_run(cfg, Path(cfg.output.dir), publisher)
    if summary is not None and getattr(publisher, "failed", None):
        summary["publish_failed"] = publisher.failed
    return summary


def run_train(cfg: TrainConfig, refresh: bool = False) -> int:
    """Run the ``train`` flow in this process on the resolved config and print the summary."""
    print_train_summary(flow_summary(cfg, refresh=refresh))
    return 0


def flow_summary(cfg: TrainConfig, refresh: bool = False) -> dict:
    """Run the ``train`` flow in this process on the resolved config: its summary (with ``prefect_failed`` when
    the Run is complete but Prefect's server could not record it)."""
    server = start_quiet_server()  # already started after the cheap checks unless a server is configured
    from verifily_train.flows.train import train  # imports Prefect while the server boots

    preload_fingerprint_modules()
    await_server(server, preload_stages=True)  # a half-started server must not be handed to the flow
    logging.raiseExceptions = False  # a log record the API refused is not printed ("--- Error logging to API ---")
    run_id = new_run_id()  # chosen here: the Run is found on disk when Prefect's API fails after publishing it
    try:
        with in_process_flow_settings():  # the config is rebuilt there, not re-validated
            summary = train(resolved_config=config_to_dict(cfg), refresh=refresh, run_id=run_id)
    except BaseException as err:
        sys.stderr.write("\n")  # end any progress bar's line so the error stands on its own
        if not is_prefect_api_error(err):
            raise
        published = published_run(Path(cfg.output.dir), run_id)
        if published is None:
            raise prefect_api_problem(err) from err
        # the Run is complete and verifiable; only Prefect's record of it failed
        summary = dict(summary_from_run(str(published)), prefect_failed=first_line(err))
    return summary


def published_run(runs_dir: Path, run_id: str) -> Optional[Path]:
    """``runs_dir/run_id`` when that Run was published (a failed-run record has no checksums), else None."""
    path = runs_dir / run_id
    return path if (path / CHECKSUMS).is_file() else None


def cmd_reproduce(args) -> int:
    return run_reproduce(find_run(args.run, args.runs_dir))


def run_reproduce(original: Path) -> int:
    """Re-run a completed Run from its recorded config with the cache off; print the comparison."""
    verify_before_use(original, "reproduce")  # a tampered Run would be "reproduced" against what it now claims
    cfg = load_config(Path(original) / "config.yaml", ["cache.enabled=false"])
    server = start_quiet_server()
    from verifily_train.flows.train import train

    await_server(server, preload_stages=True)  # the cache is off: the train stage runs

    with in_process_flow_settings():
        summary = train(resolved_config=config_to_dict(cfg), runs_dir=str(Path(original).parent))
    report = compare_reproduction(Path(original), Path(summary["path"]))
    print(render_reproduction(report))
    return 0 if report["reproduced_exactly"] else 1
