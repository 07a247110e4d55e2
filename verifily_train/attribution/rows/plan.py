"""What one row-attribution call will compute: the Run, its tokenized rows, the adapter snapshots, the target."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

from verifily_train.artifacts.run import load_run_json
from verifily_train.attribution.target import parse_slice
from verifily_train.config import TrainConfig, load_config
from verifily_train.errors import ConfigError, RunError
from verifily_train.fsio import verifily_home
from verifily_train.hashing import sha256_file
from verifily_train.model.loading import inspect_model
from verifily_train.training.snapshots import read_snapshots

ROWS_VERSION = "rows/2"  # bump when the same inputs should now give other scores

# Every score is oriented the same way: higher = more harmful (or more suspect); rank 1 = the most harmful row.
# Two families, named apart in every output (FAMILIES):
# suspect rows (no target: what the row is like, not what it does to a target's loss)
#   self_influence: sum over snapshots of lr x |grad loss(row)|^2 (TracIn's mislabel detector).
#   loss: the row's training loss under the final snapshot; loss_mean: its mean over the snapshots.
#   label_issue: classification only, 1 - cleanlab's label quality from the snapshots' mean predicted
#     probabilities of rows the model trained on (in-sample, LABEL_ISSUE_FOLDS).
# attribution (target-aware: the estimated change of the target's loss caused by training on the row)
#   tracin: sum over snapshots of -lr x <grad loss(row), grad loss(target)> (projected), as if training were SGD.
#   tracin_adam: the same with the row's gradient preconditioned as the run's AdamW stepped it, from the
#     optimizer's second moment saved with each snapshot (LESS-style): -lr x <grad target, grad row / (sqrt(v^) + eps)>.
METHODS = ("tracin", "tracin_adam", "self_influence", "loss", "loss_mean", "label_issue")
SUSPECT, ATTRIBUTION = "suspect rows", "attribution"
FAMILIES = {"tracin": ATTRIBUTION, "tracin_adam": ATTRIBUTION, "self_influence": SUSPECT, "loss": SUSPECT,
            "loss_mean": SUSPECT, "label_issue": SUSPECT}
TARGET_METHODS = tuple(m for m in METHODS if FAMILIES[m] == ATTRIBUTION)  # the methods that read the target rows
GRADIENT_METHODS = ("tracin", "tracin_adam", "self_influence")  # the methods that need per-row backward passes
LABEL_ISSUE_FOLDS = "in-sample"  # cleanlab intends out-of-fold probabilities; these rows trained the model
# measured by bench/row_attribution.py on planted errors (docs/attribution.md, "Row-level attribution"): the
# final loss found them best in every experiment (mean AUROC 0.97 against TracIn's 0.76): the suspect-row default
DEFAULT_METHOD = "loss"
# the attribution default: plain TracIn; on the LDS benchmark (bench/row_lds.py) tracin_adam measured better on the
# tiny causal LM and worse on the tiny BERT classifier, which the rule for changing it does not allow
# (docs/attribution.md, "The field's yardstick: LDS" and "Which score answers which question")
DEFAULT_ATTRIBUTION = "tracin"
DEFAULT_METHODS = (DEFAULT_METHOD, DEFAULT_ATTRIBUTION)  # the default call: one score of each family
DEFAULT_PROJECTION_DIM = 1024  # random projection size of each snapshot's gradient; 0 = no projection (exact)
DEFAULT_CHECKPOINTS = 4


@dataclass(frozen=True)
class RowAttributionPlan:
    """Everything a target-gradient or shard step needs (JSON-serialisable: ``to_dict`` / ``from_dict``)."""

    run_path: str  # the Run folder (run.json, config.yaml, adapter/, data_rows.parquet)
    tokenized_dir: str  # the tokenize stage's cache entry (train/val/test parquet of token ids, tags)
    snapshots: list  # [{"file": str, "step": int, "lr": float, "weight": float, "sha256": str}], oldest first
    target: str  # "test" | "val" | "slice:<tag>=<value>" | "slice:<tag>!=<value>" (test rows, else val rows)
    projection_dim: int  # random projection size (seeded); 0 = none
    seed: int
    methods: list  # subset of METHODS (label_issue only for classification)
    task: str = "sft"  # sft | classification
    model_source: str = ""  # the base model folder or Hub id the Run trained from
    model_kind: str = ""  # causal_lm | seq2seq_lm | seq_cls
    train_rows: int = 0  # rows of the train split (what shards divide)
    target_split: str = "test"  # the split the target rows come from
    token_data_hash: str = ""  # sha256 of the tokenized train and target split files
    model_identity: str = ""  # the base model's identity as run.json records it (weights' hash)
    lora: bool = True  # False: a full fine-tune (the Run's model/ folder)
    notes: list = field(default_factory=list)  # what the user should know (a fallback to the final adapter alone)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RowAttributionPlan":
        return cls(**data)


def plan_row_attribution(run_path: Path, target: str = "test", checkpoints: int = DEFAULT_CHECKPOINTS,
                         projection_dim: int = DEFAULT_PROJECTION_DIM, seed: int = 0,
                         cache_root: Optional[Path] = None, methods: Optional[List[str]] = None,
                         cfg: Optional[TrainConfig] = None) -> RowAttributionPlan:
    """The plan for a Run: its train stage's snapshots (``checkpoints`` of them), else its final adapter alone.

    ``cache_root``: the stage cache (default: the Run's ``cache.dir``, else ``$VERIFILY_HOME/cache``). ``cfg``:
    the Run's config as the caller loaded it (default: loaded here, through ``verifily_train.config``).
    Raises ``RunError`` when the tokenize entry is gone and ``ConfigError`` for a bad target or setting.
    """
    run = Path(run_path).resolve()
    record = load_run_json(run)
    cfg = cfg if cfg is not None else load_config(str(run / "config.yaml"))
    if checkpoints < 1:
        raise ConfigError(None, "--checkpoints", f"must be >= 1; got {checkpoints}")
    if projection_dim < 0:
        raise ConfigError(None, "--projection-dim", f"must be >= 0 (0 = no projection); got {projection_dim}")
    configured = cfg.cache.dir
    root = Path(cache_root) if cache_root else (Path(os.path.expanduser(configured)) if configured
                                                 else verifily_home() / "cache")
    stages = record.get("stages") or {}
    tokenized = root / "tokenize" / str((stages.get("tokenize") or {}).get("key"))
    if not (tokenized / "train.parquet").is_file():
        raise RunError(run, "stages.tokenize", f"its tokenized rows are gone from the cache ({tokenized}): re-run "
                                               "`verifily train` with this Run's config.yaml to rebuild them")
    task = record["job"]["task"]
    target_split = _target_split(tokenized, target)
    notes: List[str] = []
    train_entry = root / "train" / str((stages.get("train") or {}).get("key"))
    lora = cfg.lora.enabled
    saved = read_snapshots(train_entry)
    if saved:
        snapshots = [dict(s, sha256=sha256_file(s["file"])) for s in select_snapshots(saved, checkpoints)]
        if len(saved) < checkpoints:
            notes.append(f"the train stage kept {len(saved)} snapshots (training.attribution_snapshots): "
                         f"{len(saved)} checkpoints used, not {checkpoints}")
    else:
        final = run / ("adapter" if lora else "model")
        weights = sorted(final.glob("*.safetensors"))
        lr = float(cfg.training.learning_rate)
        snapshots = [{"file": "", "step": int(record.get("metrics", {}).get("train_steps") or 0), "lr": lr,
                      "weight": lr, "interval_steps": 0,
                      "sha256": sha256_file(weights[0]) if weights else ""}]
        notes.append("the train stage's cache entry holds no adapter snapshots (pruned, or trained with "
                     "training.attribution_snapshots: 0): scores use the final adapter alone (1 checkpoint)")
    chosen = _methods(methods, task, snapshots, notes)
    for s in snapshots:
        if s.get("optimizer") and "tracin_adam" in chosen:
            s["optimizer"] = dict(s["optimizer"], sha256=sha256_file(s["optimizer"]["file"]))
    import pyarrow.parquet as pq

    spec = inspect_model(record["model_source"], task, cfg.trust_remote_code)
    return RowAttributionPlan(
        run_path=str(run), tokenized_dir=str(tokenized), snapshots=snapshots, target=target,
        projection_dim=int(projection_dim), seed=int(seed), methods=chosen, task=task,
        model_source=record["model_source"], model_kind=spec.kind,
        train_rows=pq.ParquetFile(tokenized / "train.parquet").metadata.num_rows, target_split=target_split,
        token_data_hash=sha256_file(tokenized / "train.parquet") + "/" + sha256_file(tokenized / f"{target_split}.parquet"),
        model_identity=str(record.get("model_identity") or ""), lora=lora, notes=notes)


def select_snapshots(saved: List[dict], count: int) -> List[dict]:
    """``count`` of the saved snapshots, evenly spaced and ending at the last; each kept one's weight (summed
    learning rate) also covers the dropped ones before it, so the kept weights still sum over the whole run."""
    if count >= len(saved):
        return list(saved)
    picks = sorted({(2 * (k + 1) * len(saved) + count) // (2 * count) - 1 for k in range(count)})
    out, previous = [], -1
    for i in picks:
        covered = saved[previous + 1:i + 1]
        steps = sum(s.get("interval_steps", 0) for s in covered)
        weight = sum(s["weight"] for s in covered)
        out.append(dict(saved[i], weight=weight, interval_steps=steps, lr=weight / max(steps, 1)))
        previous = i
    return out


def _target_split(tokenized: Path, target: str) -> str:
    """The split the target rows come from; a slice needs rows with that tag value."""
    import json

    import pyarrow.parquet as pq

    if target in ("test", "val"):
        if not (tokenized / f"{target}.parquet").is_file():
            raise ConfigError(None, "--target", f"the Run has no {target} split")
        return target
    key, negate, value = parse_slice_target(target)
    split = "test" if (tokenized / "test.parquet").is_file() else "val"
    if not (tokenized / f"{split}.parquet").is_file():
        raise ConfigError(None, "--target", "the Run has neither a test nor a val split to take the slice from")
    tags = [json.loads(t) for t in pq.read_table(tokenized / f"{split}.parquet", columns=["tags"]).column("tags").to_pylist()]
    parse_slice_target(target, keys={k for t in tags for k in t})  # an unknown key is refused in both forms
    if not any(in_slice(t, key, negate, value) for t in tags):
        raise ConfigError(None, "--target", f"no {split} rows have tag {key}{'!=' if negate else '='}{value}")
    return split


TARGET_FORMS = "test, val, slice:<tag>=<value> or slice:<tag>!=<value>"


def parse_slice_target(target: str, keys=None) -> tuple:
    """``slice:<tag>=<value>`` -> (tag, False, value); ``slice:<tag>!=<value>`` -> (tag, True, value), the rows
    not tagged that value (a leave-one-value-out verdict's own slice); ``ConfigError`` for anything else."""
    return parse_slice(target, TARGET_FORMS, keys=keys)


def in_slice(tags: dict, key: str, negate: bool, value: str) -> bool:
    """Whether a row with these tags is in the slice (a row without the tag is not ``=`` any value)."""
    return (str(tags.get(key)) != value) if negate else (key in tags and str(tags[key]) == value)


def _methods(methods: Optional[List[str]], task: str, snapshots: List[dict], notes: List[str]) -> List[str]:
    """The methods to compute: ``None`` = every one this run allows (a note for each left out)."""
    adam = bool(snapshots) and all(s.get("optimizer") for s in snapshots)
    if methods is None:
        chosen = [m for m in METHODS if m != "label_issue" or task == "classification"]
        if not adam:
            notes.append("tracin_adam left out: the snapshots hold no AdamW moments (trained before they were "
                         "saved, or with another optimizer): retrain to score with it")
            chosen.remove("tracin_adam")
        return chosen
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(None, "--methods", f"unknown method {unknown[0]!r}; one of {', '.join(METHODS)}")
    if "label_issue" in methods and task != "classification":
        raise ConfigError(None, "--methods", "label_issue needs a classification run")
    if "tracin_adam" in methods and not adam:
        raise ConfigError(None, "--methods", "tracin_adam needs the AdamW moments saved with every adapter "
                                             "snapshot, and these snapshots hold none (trained before they were "
                                             "saved, the final adapter alone, or another optimizer): retrain, or "
                                             "use tracin")
    return [m for m in METHODS if m in methods]


def target_rows(plan: RowAttributionPlan) -> List[int]:
    """Indices of the target rows within ``plan.target_split``."""
    import json

    import pyarrow.parquet as pq

    tags = pq.read_table(Path(plan.tokenized_dir) / f"{plan.target_split}.parquet", columns=["tags"]).column("tags")
    if not plan.target.startswith("slice:"):
        return list(range(len(tags)))
    key, negate, value = parse_slice_target(plan.target)
    return [i for i, t in enumerate(tags.to_pylist()) if in_slice(json.loads(t), key, negate, value)]


def key_inputs(plan: RowAttributionPlan) -> tuple:
    """What a cache key of this plan's steps must hash: snapshot hashes and weights, token data hash,
    model identity, target, projection size, seed, methods; never a path (add the code version yourself)."""
    return (ROWS_VERSION, plan.task, plan.model_kind, plan.model_identity, plan.lora,
            [[s["sha256"], s["step"], repr(float(s["weight"])), (s.get("optimizer") or {}).get("sha256", "")]
             for s in plan.snapshots],
            plan.token_data_hash, plan.target, plan.target_split, int(plan.projection_dim), int(plan.seed),
            list(plan.methods))
