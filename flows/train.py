"""The ``train`` flow: fingerprint, then the pipeline's stages as Prefect tasks (pipeline/runner.py), then the Run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

from prefect import flow, get_run_logger
from prefect.runtime import deployment, flow_run
from prefect.utilities.annotations import quote

from verifily_train.config import from_resolved, load_config
from verifily_train.config.hashing import config_hash
from verifily_train.config.schema import MANAGED_MESSAGE, OutputSection, TrainConfig
from verifily_train.dataset.store import resolve_manifest_path
from verifily_train.flows.report import PrefectPublisher
from verifily_train.fsio import verifily_home
from verifily_train.pipeline.runner import CacheSettings, finish_group, new_start, replicate_configs, run_pipeline
from verifily_train.tasks.common import fingerprint, stage_task, value, write_artifact


def run_name() -> str:
    """``sft-ds_x@v2-1a2b3c4d``: task, resolved dataset version, short config hash (the UI's runs list)."""
    params = flow_run.parameters
    try:
        cfg = _config(params.get("resolved_config"), params.get("config"), params.get("overrides"),
                      params.get("dataset"), for_the_body=True)
        ref = cfg.dataset_version or "data_paths"
        if ref.endswith("@latest"):
            ref = f"{ref.split('@')[0]}@{resolve_manifest_path(ref).parent.name}"
        elif ref.endswith(".json"):
            ref = Path(ref).parent.parent.name + "@" + Path(ref).parent.name
        return f"{cfg.task}-{ref}-{config_hash(cfg)[:8]}"
    except Exception:  # a bad config fails in the flow itself, with its own message
        return f"train-{params.get('dataset') or 'config'}"


# An unresolved config that ``run_name`` parsed, by its inputs' canonical bytes: the flow body it names takes it
# instead of parsing it again (a parse of the same bytes, overrides, dataset and working folder gives the same config).
_PARSED_FOR_BODY: Dict[str, TrainConfig] = {}


def _config(resolved_config: Optional[dict], config, overrides: Optional[List[str]], dataset: Optional[str],
            for_the_body: bool = False) -> TrainConfig:
    """The typed config: ``resolved_config`` rebuilt as it is (validated where it was resolved), else parsed and
    validated once per flow run (a deployment's train.yaml path or inline mapping): ``run_name`` parses it
    ``for_the_body``, and the body takes that parse when its inputs are unchanged."""
    if resolved_config is not None:
        return from_resolved(resolved_config)
    key = _parse_key(config, overrides, dataset)
    cfg = _PARSED_FOR_BODY.pop(key, None) if key else None
    if cfg is None:
        cfg = load_config(config, overrides or [], dataset=dataset)
    if for_the_body and key:
        if len(_PARSED_FOR_BODY) >= 8:  # bodies that never ran (a crashed start) leave no growing memo
            _PARSED_FOR_BODY.clear()
        _PARSED_FOR_BODY[key] = cfg
    return cfg


def _parse_key(config, overrides: Optional[List[str]], dataset: Optional[str]) -> Optional[str]:
    """What a parse of this config reads, as canonical bytes: the inline mapping or the file's path and bytes, the
    overrides, the dataset and the working folder (relative paths resolve against it). None: unreadable."""
    try:
        if isinstance(config, dict):
            source = json.dumps(config, sort_keys=True, default=str)
        elif config is not None:
            path = Path(config).resolve()
            source = f"{path}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
        else:
            source = ""
        return json.dumps([source, list(overrides or []), dataset, os.getcwd()])
    except (OSError, TypeError, ValueError):  # the parse itself reports it
        return None


def _runs_dir(cfg, runs_dir: Optional[str]) -> Path:
    """Deployment runs land in ``$VERIFILY_HOME/runs`` unless the config names an output.dir."""
    if runs_dir:
        return Path(os.path.expandvars(os.path.expanduser(runs_dir)))
    if deployment.id and cfg.output.dir == OutputSection.dir:
        return verifily_home() / "runs"
    return Path(cfg.output.dir)


class StageChain:
    """The stages as Prefect tasks, each waiting on the one before it: the UI's task graph is the chain
    fingerprint -> validate-manifest -> ... -> write-artifact. A stage still reads every manifest before it, but
    those travel ``quote``d: Prefect would otherwise draw an edge from every task whose result it finds in the
    arguments (the fingerprint and each earlier manifest, to every later task)."""

    def __init__(self, cfg, cache: CacheSettings):
        self.cache = cache
        self.last = fingerprint(cfg, cache, return_state=True)

    @property
    def fingerprint(self) -> dict:
        return value(self.last)  # bad config, data or model fail here, before any run folder exists

    def execute(self, stage, ctx) -> dict:
        """One stage as its Prefect task, with the retries its config section sets."""
        run = stage_task(stage).with_options(retries=stage.retries_for(ctx.cfg))
        self.last = run(quote(ctx), self.cache, wait_for=[self.last], return_state=True)
        return value(self.last)

    def write(self, cfg, start, fp, done, runs_dir, charts_dir) -> dict:
        self.last = write_artifact(cfg, start, quote(fp), quote(done), runs_dir, charts_dir, wait_for=[self.last],
                                   return_state=True)
        return value(self.last)


@flow(name="train", flow_run_name=run_name, log_prints=False, validate_parameters=False)
def train(config: Optional[Union[str, dict]] = None, overrides: Optional[List[str]] = None,
          dataset: Optional[str] = None, runs_dir: Optional[str] = None, refresh: bool = False,
          once: bool = False, resolved_config: Optional[dict] = None, run_id: Optional[str] = None) -> dict:
    """Train a LoRA adapter on a DatasetVersion and write an immutable Run; returns the run summary.

    ``config`` is a train.yaml path or a config mapping (a deployment's inline ``config``), parsed and validated
    here with ``overrides`` (dotted key=value strings) and ``dataset``. ``resolved_config`` is what ``verifily
    train`` passes instead: the config it parsed and validated once, as ``config_to_dict`` gives it, rebuilt and
    not validated again. ``once`` (retraining): skip when this dataset version was already trained (or is being
    trained) under the same training config. ``run_id`` is the id the Run gets (``verifily train`` chooses it, so
    it finds the Run on disk when Prefect's API fails after it is published); a group's members get their own.
    """
    cfg = _config(resolved_config, config, overrides, dataset)
    logger = get_run_logger()
    if cfg.compute.mode == "managed":
        logger.info(MANAGED_MESSAGE)
        return {"status": "not_run", "message": MANAGED_MESSAGE}
    start = new_start(run_id)
    cache = CacheSettings.for_config(cfg, refresh)
    if cfg.training.replicates > 1:
        return _train_group(cfg, _runs_dir(cfg, runs_dir), cache, once, logger)
    chain = StageChain(cfg, cache)
    return run_pipeline(cfg, chain.fingerprint, _runs_dir(cfg, runs_dir), cache, execute=chain.execute,
                        publisher=PrefectPublisher(), write=chain.write, once=once, start=start, log=logger.info)


def _train_group(cfg, runs_dir: Path, cache: CacheSettings, once: bool, logger) -> dict:
    """``training.replicates`` runs of the config at consecutive seeds, one after another in this flow run
    (each its own Run, sharing the seed-free stages' cache entries), then the group record and, when the
    previous dataset version was trained as a group, the seed-level comparison with it."""
    members = []
    for member in replicate_configs(cfg):
        logger.info(f"replicate {len(members) + 1}/{cfg.training.replicates}: seed {member.seed}")
        chain = StageChain(member, cache)
        members.append((member, run_pipeline(member, chain.fingerprint, runs_dir, cache, execute=chain.execute,
                                             publisher=PrefectPublisher(), write=chain.write, once=once,
                                             start=new_start(), log=logger.info, compare_previous=False)))
    summary = finish_group(cfg, members, runs_dir, PrefectPublisher())
    if summary.get("group_id"):
        logger.info(f"run group {summary['group_id']}: {len(summary['members'])} runs, seeds "
                    f"{', '.join(map(str, summary['seeds']))}")
    return summary
