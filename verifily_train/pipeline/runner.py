"""The one runner of the ``train`` pipeline: the Prefect flow and replay both call :func:`run_pipeline`.

The caller decides how a stage executes (the flow: as a Prefect task; replay: from the entries its record
names) and where the Run's summary is published (the flow: Prefect artifacts); everything else, from the
claim to the comparison with the previous dataset version's run, happens here once, for both.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

from verifily_train.artifacts.compare import compare_runs, render_comparison
from verifily_train.artifacts.groups import compare_groups, group_of_run, load_group, render_group_markdown, write_group
from verifily_train.artifacts.hub import push_adapter
from verifily_train.artifacts.record import RunFragment, RunStart, job_record, run_summary, write_run_record
from verifily_train.artifacts.run import new_run_id, utc_now, write_failed_run
from verifily_train.artifacts.tables import final_log_lines, stage_log_line
from verifily_train.artifacts.trackers import start_tracking
from verifily_train.config import config_to_dict
from verifily_train.config.schema import TrainConfig
from verifily_train.pipeline import claims, evaluate, hard_examples, replay, slice, tokenize, train, validate
from verifily_train.pipeline.cache import CacheMode, cache_root, discard_private, holding, run_cached
from verifily_train.pipeline.contract import Fingerprint, StageOutput
from verifily_train.pipeline.stage import Stage, StageContext

STAGES = (validate.STAGE, tokenize.STAGE, train.STAGE, evaluate.STAGE, evaluate.BASELINE, slice.STAGE,
          hard_examples.STAGE)


@dataclass(frozen=True)
class CacheSettings:
    """Where the stage cache lives and whether this run reads and writes it (JSON-able for task parameters)."""

    root: str
    read: bool = True
    write: bool = True

    @classmethod
    def for_config(cls, cfg: TrainConfig, refresh: bool = False) -> "CacheSettings":
        mode = CacheMode.from_flags(cfg.cache.enabled, refresh)
        return cls(str(cache_root(cfg.cache.dir)), mode.read, mode.write)

    @property
    def mode(self) -> CacheMode:
        return CacheMode(read=self.read, write=self.write)


def compute_stage(stage: Stage, ctx: StageContext, cache: CacheSettings) -> StageOutput:
    """The stage's output from its cache entry for this context's key, or computed and stored."""
    return stage.read(run_cached(stage.name, stage.key(ctx), Path(cache.root), cache.mode,
                                 lambda out, work: stage.produce(ctx, out, work).to_json()))


def stage_report(done: Mapping[str, StageOutput]) -> Dict[str, dict]:
    """Per stage: cache hit or not, seconds, and key (what run.json and the summary show)."""
    return {name: output.report() for name, output in done.items()}


def write_run(cfg: TrainConfig, start: RunStart, fp: Fingerprint, done: Mapping[str, Union[StageOutput, dict]],
              runs_dir: Path, charts_dir: Optional[Path] = None) -> dict:
    """The Run of these stage outputs (or their JSON forms, as a script holds them): each contributes its fragment."""
    done = {name: BY_NAME[name].read(output) for name, output in done.items()}
    fragments = [fp.run_fragment(), *(output.run_fragment(fp) for output in done.values()),
                 RunFragment(record={"stages": stage_report(done)})]
    return write_run_record(cfg, start, fragments, runs_dir, charts_dir)


class Publisher:
    """Where a completed Run is announced; this base announces nothing (the flow's publishes Prefect artifacts)."""

    def run_artifacts(self, summary: dict) -> None:
        """The Run's metrics, slices, hard examples and path."""

    def comparison(self, previous: Path, current: Path, text: str) -> None:
        """``verifily compare`` of the previous dataset version's run against this one (markdown)."""


Execute = Callable[[Stage, StageContext], StageOutput]
Write = Callable[[TrainConfig, RunStart, Fingerprint, Dict[str, StageOutput], Path, Optional[Path]], dict]


def new_start(run_id: Optional[str] = None) -> RunStart:
    """A run starting now, under ``run_id`` when the caller chose it (to find the Run should its orchestrator fail)."""
    return RunStart(run_id or new_run_id(), utc_now(), time.time())


def run_pipeline(cfg: TrainConfig, fp: Fingerprint, runs_dir: Path, cache: CacheSettings, execute: Execute,
                 publisher: Publisher = Publisher(), write: Write = write_run, once: bool = False,
                 start: Optional[RunStart] = None, log: Callable[[str], None] = lambda message: None,
                 compare_previous: bool = True) -> dict:
    """Every stage in order, then the Run, the claim, the replay record, the artifacts and the comparison.

    ``once`` (retraining): skip when this dataset version was already trained (or is being trained) under the
    same training config. A failure after the first stage leaves a failed-run record in ``runs_dir``. ``log``
    gets one line per finished stage and, at the end, the final metrics and the Run's path (the flow run's logs).
    """
    start = start or new_start()
    key = claims.claim_key(fp.data_hash, claims.training_config_hash(cfg))
    owner = f"{start.run_id}:{os.getpid()}"
    if once:
        held = claims.claim(key, {"owner": owner, "dataset_ref": fp.dataset["ref"], "claimed_at": utc_now()})
        if held is not None:
            log(f"{fp.dataset['ref']} is already {held.get('status')} under this training config "
                f"({held.get('run_path') or held.get('owner')}): not training it again")
            return {"status": "skipped", "dataset": fp.dataset["ref"], "claim": held}
    done: Dict[str, StageOutput] = {}
    charts = Path(cache.root) / "charts" if cfg.cache.enabled else None
    tracking = start_tracking(cfg, start.run_id)  # training.report_to: one tracker run for the Trainer and the Run
    with holding():  # the entries this run reads are held until they are in the Run (cache clear skips them)
        try:
            tracking.stages_begin()
            for stage in STAGES:
                done[stage.name] = stage.read(execute(stage, stage.context(cfg, fp, done)))
                log(stage_log_line(stage.name, done[stage.name].to_json()))
            written = write(cfg, start, fp, done, runs_dir, charts)
        except BaseException as err:
            tracking.failed()
            if once:
                claims.release(key, owner)
            if isinstance(err, Exception) and "validate" in done:  # bad config, data or model fail before any record
                _record_failure(cfg, start, fp, done, runs_dir, err)
            raise
        finally:
            tracking.stages_end()
            if not cache.write:  # cache off: the stages computed into private folders nobody else reads
                discard_private(output.private for output in done.values())
    summary = _finish(cfg, fp, done, written, cache, publisher, compare_previous)
    for line in final_log_lines(summary):
        log(line)
    tracker_warnings = tracking.completed(summary)
    if tracker_warnings:
        summary["tracker_warnings"] = tracker_warnings
    return summary


def _record_failure(cfg: TrainConfig, start: RunStart, fp: Fingerprint, done: Dict[str, StageOutput],
                    runs_dir: Path, err: Exception) -> None:
    dataset = fp.dataset_now(done["validate"])
    record = {"job": job_record(cfg, start.run_id, start.started_at, dataset, None), "started_at": start.started_at,
              "duration_seconds": round(time.time() - start.started_clock, 3), "metrics": {},
              "stages": stage_report(done)}
    write_failed_run(runs_dir, start.run_id, record, err)


def _finish(cfg: TrainConfig, fp: Fingerprint, done: Dict[str, StageOutput], written: dict, cache: CacheSettings,
            publisher: Publisher, compare_previous: bool = True) -> dict:
    summary = run_summary(written, done["evaluate"].to_json(), done["slice"].to_json(),
                          done["hard_examples"].to_json())
    claims.complete_run(cfg, fp, done["validate"], written)
    if cache.write:  # the next identical run can be answered from these entries (pipeline/replay.py)
        replay.remember(cfg, fp, done, Path(cache.root), STAGES)
    publisher.run_artifacts(summary)
    ds = done["validate"].dataset
    previous = claims.previous_run(claims.training_config_hash(cfg), ds["dataset_id"], ds.get("created_at") or "",
                                   ds["version"])
    if previous is not None:
        summary["previous_run"] = previous["run_path"]
    if previous is not None and compare_previous:  # one run per side: a model-level comparison, titled as such
        before, now = Path(previous["run_path"]), Path(written["path"])
        publisher.comparison(before, now, render_comparison(compare_runs(before, now), markdown=True))
        summary["compared_with"] = str(before)
    if cfg.output.push_to_hub:
        summary["pushed_to"] = push_adapter(cfg, Path(written["path"]))
    return summary


def replicate_configs(cfg: TrainConfig) -> List[TrainConfig]:
    """The member configs of a replicate group: seeds seed .. seed + replicates - 1, each a single run (a member
    is the very run ``verifily train`` makes at that seed, so they share cache entries)."""
    single = dataclasses.replace(cfg.training, replicates=1)
    return [dataclasses.replace(cfg, seed=cfg.seed + i, training=single) for i in range(cfg.training.replicates)]


def finish_group(cfg: TrainConfig, members: List[Tuple[TrainConfig, dict]], runs_dir: Path,
                 publisher: Publisher = Publisher()) -> dict:
    """Publish the group record of completed member runs and, when the previous dataset version was trained
    as a group under this config, compare the two groups at the seed level (the question about the change)."""
    done = [(m, s) for m, s in members if s.get("status") != "skipped"]
    if not done:
        return {"status": "skipped", "members": [s for _, s in members]}
    written = write_group(runs_dir, config_to_dict(cfg), [dict(s, seed=m.seed) for m, s in done])
    summary = {"group_id": written["group_id"], "path": written["path"], "seeds": [m.seed for m, _ in done],
               "members": [s for _, s in done]}
    previous = done[0][1].get("previous_run")
    before = group_of_run(Path(previous)) if previous else None
    if before is not None:
        old = load_group(before)
        new = load_group(Path(written["path"]))
        result = compare_groups({"group_id": old["group_id"], "runs": old["member_paths"], "seeds": old["seeds"]},
                                {"group_id": new["group_id"], "runs": new["member_paths"], "seeds": new["seeds"]})
        publisher.comparison(before, Path(written["path"]), render_group_markdown(result))
        summary["compared_with"] = str(before)
    return summary


def replay_run(cfg: TrainConfig, runs_dir: Path, publisher: Publisher = Publisher()) -> Optional[dict]:
    """A new Run from the recorded entries when these exact inputs completed before; its summary, or None."""
    start = new_start()
    cache = CacheSettings.for_config(cfg)
    with holding():  # the entries replay verified stay held until the Run is written from them
        found = replay.find(cfg, Path(cache.root), STAGES)
        if found is None:
            return None
        summary = run_pipeline(cfg, found.fingerprint, runs_dir, cache, lambda stage, ctx: found.outputs[stage.name],
                               publisher, start=start)
    return dict(summary, replayed=True)


BY_NAME = {stage.name: stage for stage in STAGES}


def run_uncached(name: str, cfg: TrainConfig, fp: Fingerprint, out_dir: Path, work_dir: Path,
                 **done: Union[StageOutput, dict]) -> dict:
    """One stage run straight into ``out_dir``, without the cache (how benchmarks and tests drive a stage): its
    output's JSON form.

    ``done`` holds the outputs (or their JSON forms, with ``dir``) of the stages it reads, by stage name
    (``tokenize=...``, ``train=...``); those it does not need are ignored. Unlike the runner, it does not insist
    on every stage in ``needs``: a script may tokenize data it knows valid without a validate output.
    """
    stage = BY_NAME[name]
    outputs = {other: BY_NAME[other].read(output) for other, output in done.items() if other in stage.needs}
    return stage.produce(StageContext(cfg, fp, outputs), out_dir, work_dir).to_json()
