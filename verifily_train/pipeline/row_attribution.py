"""The stages of ``verifily attribute RUN --rows``: target gradients, one gradient pass per shard, the merge.

Each is a :class:`~verifily_train.pipeline.stage.Stage` (name, manual version, declaring module, key inputs
next to its run function), cached by ``pipeline/cache.run_cached`` under ``<cache>/<stage>/<key>/`` like the
train pipeline's stages, so one task factory (``tasks/common.stage_task``) runs them all. A key hashes the
plan's content (snapshot hashes and weights, the tokenized rows, model identity, target, projection, seed,
methods: ``attribution.rows.key_inputs``), the upstream outputs and, for a shard, its index and count:
a second call is all hits, and sharding a call differently re-runs only the shards.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

from verifily_train.artifacts.run import load_run_json
from verifily_train.attribution import rows
from verifily_train.attribution.row_verify import selection_target
from verifily_train.attribution.rows.runtime import SCORE_BATCH
from verifily_train.config import TrainConfig
from verifily_train.errors import ConfigError, RunError
from verifily_train.pipeline.cache import cache_root
from verifily_train.pipeline.contract import StageOutput
from verifily_train.pipeline.stage import Stage

DEFAULT_CHECKPOINTS = 4  # the train stage keeps 4 snapshots by default (training.attribution_snapshots)
DEFAULT_PROJECTION_DIM = rows.DEFAULT_PROJECTION_DIM


@dataclass(frozen=True)
class RowContext:
    """What a row-attribution stage reads: the plan, its shard, and the outputs of the stages before it."""

    plan: rows.RowAttributionPlan
    shard: Tuple[int, int] = (0, 1)  # (index, count)
    done: Mapping[str, object] = field(default_factory=dict)  # "row_target": output; "row_shard": [outputs]
    on_progress: Optional[Callable[[int, int], None]] = None  # the task factory's hook (unused here)

    def __getitem__(self, stage: str):
        return self.done[stage]


@dataclass(frozen=True, kw_only=True)
class RowTarget(StageOutput):
    """Target gradients: ``file`` holds the projected gradient of the target's mean loss per snapshot."""

    STAGE: ClassVar[str] = "row_target"
    step: str
    file: str
    snapshots: List[Any]
    target: str
    target_split: str
    target_rows: int
    target_loss: List[Any]
    projection_dim: int
    parameters: int
    projection: Optional[str] = field(default=None, metadata={"omit_if_none": True})  # absent: no snapshot kept


@dataclass(frozen=True, kw_only=True)
class RowShard(StageOutput):
    """One shard's per-row gradients and scores (``file``)."""

    STAGE: ClassVar[str] = "row_shard"
    step: str
    file: str
    shard_index: int
    shard_count: int
    rows: int
    per_row_gradients: str


@dataclass(frozen=True, kw_only=True)
class RowMerge(StageOutput):
    """Every train row with each method's score and rank (``file``: row_attribution.parquet)."""

    STAGE: ClassVar[str] = "row_merge"
    step: str
    file: str
    rows: int
    methods: List[str]
    default_method: str
    families: Dict[str, Any]
    target: str
    target_split: str
    checkpoints: int
    projection_dim: int
    seed: int
    notes: List[str]
    orientation: str


def manifest(output) -> dict:
    """A row stage's output as the JSON mapping its readers take (``rows.score_shard``, ``row_output``)."""
    return output.to_json() if hasattr(output, "to_json") else dict(output)


def _target_key(ctx: RowContext) -> tuple:
    return tuple(rows.key_inputs(ctx.plan))


def _run_target(ctx: RowContext, out_dir: Path, work_dir: Path) -> RowTarget:
    return RowTarget(stage=RowTarget.STAGE, **rows.target_gradients(ctx.plan, out_dir))


def _shard_key(ctx: RowContext) -> tuple:
    index, count = ctx.shard
    return tuple(rows.key_inputs(ctx.plan)) + (manifest(ctx["row_target"])["output_hash"], index, count)


def _run_shard(ctx: RowContext, out_dir: Path, work_dir: Path) -> RowShard:
    index, count = ctx.shard
    target = manifest(ctx["row_target"])
    return RowShard(stage=RowShard.STAGE, **rows.score_shard(ctx.plan, target, index, count, out_dir,
                                                             target_dir=Path(target["dir"])))


def _merge_key(ctx: RowContext) -> tuple:
    return tuple(rows.key_inputs(ctx.plan)) + tuple(manifest(m)["output_hash"] for m in ctx["row_shard"])


def _run_merge(ctx: RowContext, out_dir: Path, work_dir: Path) -> RowMerge:
    shards = [manifest(m) for m in ctx["row_shard"]]
    return RowMerge(stage=RowMerge.STAGE, **rows.merge_shards(ctx.plan, shards, out_dir,
                                                              shard_dirs=[Path(m["dir"]) for m in shards]))


TARGET = Stage("row_target", "row-target-gradients", "row_target/1", __name__, _target_key, _run_target, RowTarget,
               description="Projected gradient of the target's mean loss at every adapter snapshot.")
SHARD = Stage("row_shard", "row-gradient-shard", "row_shard/1", __name__, _shard_key, _run_shard, RowShard,
              needs=("row_target",),
              description="Per-row gradients of one shard of the train rows at every snapshot: TracIn (plain and "
                          "AdamW-preconditioned), self-influence, loss dynamics (and classification probabilities).")
MERGE = Stage("row_merge", "row-attribution-merge", "row_merge/1", __name__, _merge_key, _run_merge, RowMerge,
              needs=("row_shard",),
              description="Every train row with each method's score and rank: row_attribution.parquet.")
STAGES = (TARGET, SHARD, MERGE)


def plan_rows(run: Path, target: str = "test", checkpoints: Optional[int] = None,
              projection_dim: int = DEFAULT_PROJECTION_DIM, seed: int = 0,
              methods: Optional[List[str]] = None, cfg: Optional[TrainConfig] = None) -> rows.RowAttributionPlan:
    """The row-attribution plan of a completed Run; a user error (one line) when it cannot be made.

    ``checkpoints`` None: up to the default, falling back to the final adapter alone (with a note) when the
    train stage kept no snapshots; a number above 1 given explicitly then is an error, not a silent fallback.
    ``methods`` None: the default of each family (``rows.DEFAULT_METHODS``: loss for suspect rows, the best
    measured on planted errors; TracIn for attribution); ``["all"]``: every method this run allows, side by side.
    """
    methods = list(rows.DEFAULT_METHODS) if methods is None else (None if list(methods) == ["all"] else methods)

    record = load_run_json(run)
    if record.get("status") != "completed":
        raise RunError(run, None, f"status is {record.get('status')!r}; only a completed run can be attributed")
    plan = rows.plan_row_attribution(run, target, checkpoints or DEFAULT_CHECKPOINTS, projection_dim, seed,
                                     methods=methods, cfg=cfg)
    kept = [s for s in plan.snapshots if s.get("file")]
    if checkpoints is not None and checkpoints > 1 and not kept:
        raise ConfigError(None, "--checkpoints", f"{checkpoints} checkpoints asked, but the train stage of "
                                                 f"{run.name} kept no adapter snapshots (pruned from the cache, or "
                                                 "trained with training.attribution_snapshots: 0): use "
                                                 "--checkpoints 1 (the final adapter) or retrain")
    return plan


def plan_for_call(parent: Path, target: str, checkpoints: Optional[int], projection_dim: int, seed: int,
                  methods: Optional[List[str]], verify: int, select: Optional[str],
                  same_rows: bool, cfg: Optional[TrainConfig] = None) -> rows.RowAttributionPlan:
    """The scoring plan: against ``target``, or with ``verify`` against the selection rows (``select``, else val);
    ``cfg``: the Run's config when the caller has loaded it."""
    if not verify:
        if select is not None or same_rows:
            raise ConfigError(None, "--select" if select is not None else "--same-rows",
                              "names the rows --verify ranks with: give it with --verify K")
        return plan_rows(parent, target, checkpoints, projection_dim, seed, methods, cfg)
    chosen = selection_target(select, target, same_rows)
    try:
        return plan_rows(parent, chosen, checkpoints, projection_dim, seed, methods, cfg)
    except ConfigError as err:
        if err.key != "--target" or chosen == target:
            raise
        raise ConfigError(None, "--select", f"{chosen}: {err.problem} (--verify ranks with the val split by default; "
                                            "name a slice disjoint from --target, or pass --same-rows)") from None


def shard_count(plan: rows.RowAttributionPlan, asked: int) -> Tuple[int, List[str]]:
    """The shards to run (at most one per batch of :data:`SCORE_BATCH` rows) and a note when fewer than asked."""
    if asked < 1:
        raise ConfigError(None, "--shards", f"must be >= 1; got {asked}")
    batches = max(1, math.ceil(plan.train_rows / SCORE_BATCH))
    if asked <= batches:
        return asked, []
    return batches, [f"{asked} shards asked; {plan.train_rows} train rows make {batches} batch(es) of "
                     f"{SCORE_BATCH}, so {batches} shard(s) ran"]


def train_stage_seconds(run: Path, record: dict, cfg: TrainConfig) -> Tuple[Optional[float], str]:
    """The Run's own train-stage seconds (what the cost ratio divides by) and where the figure comes from.

    run.json's ``stages.train.seconds`` when the stage ran in that Run; when it was a cache hit there, the
    train loop's own ``train_seconds`` from the train stage's cache entry (the time it took when it ran);
    ``cfg`` is the Run's config (its cache folder).
    """
    entry = (record.get("stages") or {}).get("train") or {}
    if entry.get("seconds") and not entry.get("cache_hit"):
        return float(entry["seconds"]), "run.json stages.train.seconds"
    stage_json = cache_root(cfg.cache.dir) / "train" / str(entry.get("key")) / "stage.json"
    try:
        seconds = json.loads(stage_json.read_text(encoding="utf-8")).get("train_seconds")
    except (OSError, ValueError):
        seconds = None
    return (float(seconds), "train stage cache entry train_seconds") if seconds else (None, "unknown")
