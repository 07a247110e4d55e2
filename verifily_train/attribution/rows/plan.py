"""What one row-attribution call will compute: the Run, its tokenized rows, the adapter snapshots, the target."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

# Every score is oriented the same way: higher = more harmful (or more suspect); rank 1 = the most harmful row.
# tracin: estimated change of the target's loss caused by training on the row, sum over snapshots of
#   -lr x <grad loss(row), grad loss(target)> (projected); positive = the row raised the target's loss.
# self_influence: sum over snapshots of lr x |grad loss(row)|^2 (TracIn's mislabel detector; no target).
# loss: the row's training loss under the final snapshot; loss_mean: its mean over the snapshots.
# label_issue: classification only, 1 - cleanlab's label quality from the snapshots' mean predicted probabilities.
METHODS = ("tracin", "self_influence", "loss", "loss_mean", "label_issue")
DEFAULT_METHOD = "tracin"  # provisional until bench/row_attribution.py has measured (docs/attribution.md)
DEFAULT_PROJECTION_DIM = 1024  # random projection size of each snapshot's gradient; 0 = no projection (exact)
DEFAULT_CHECKPOINTS = 4


@dataclass(frozen=True)
class RowAttributionPlan:
    """Everything a target-gradient or shard step needs (JSON-serialisable: ``to_dict`` / ``from_dict``)."""

    run_path: str  # the Run folder (run.json, config.yaml, adapter/, data_rows.parquet)
    tokenized_dir: str  # the tokenize stage's cache entry (train/val/test parquet of token ids, tags)
    snapshots: list  # [{"file": str, "step": int, "lr": float, "weight": float, "sha256": str}], oldest first
    target: str  # "test" | "val" | "slice:<tag>=<value>" (test rows, else val rows, of that tag value)
    projection_dim: int  # random projection size (seeded); 0 = none
    seed: int
    methods: list  # subset of METHODS (label_issue only for classification)
    task: str = "sft"  # sft | classification
    model_source: str = ""  # the base model folder or Hub id the Run trained from
    model_kind: str = ""  # causal_lm | seq2seq_lm | seq_cls
    train_rows: int = 0  # rows of the train split (what shards divide)
    target_split: str = "test"  # the split the target rows come from
    token_data_hash: str = ""  # sha256 of the tokenized train and target split files
    notes: list = field(default_factory=list)  # what the user should know (a fallback to the final adapter alone)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RowAttributionPlan":
        return cls(**data)


def plan_row_attribution(run_path: Path, target: str = "test", checkpoints: int = DEFAULT_CHECKPOINTS,
                         projection_dim: int = DEFAULT_PROJECTION_DIM, seed: int = 0,
                         cache_root: Optional[Path] = None, methods: Optional[List[str]] = None) -> RowAttributionPlan:
    """The plan for a Run: its train stage's snapshots (the last ``checkpoints``), else its final adapter alone.

    ``cache_root``: the stage cache (default: the Run's ``cache.dir``, else ``$VERIFILY_HOME/cache``).
    Raises ``RunError`` when the tokenize entry is gone and ``ConfigError`` for a bad target or size.
    """
    raise NotImplementedError


def key_inputs(plan: RowAttributionPlan) -> tuple:
    """What a cache key of this plan's steps must hash: snapshot hashes and weights, token data hash,
    model identity, target, projection size, seed, methods; never a path."""
    raise NotImplementedError
