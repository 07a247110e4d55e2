"""Merge the shards into ``row_attribution.parquet``: every train row with each method's score and rank."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

from verifily_train.attribution.rows.plan import (ATTRIBUTION, DEFAULT_ATTRIBUTION, DEFAULT_METHOD, FAMILIES,
                                                  LABEL_ISSUE_FOLDS, SUSPECT, RowAttributionPlan)
from verifily_train.attribution.rows.scores import score_shard, target_gradients

RESULT_FILE = "row_attribution.parquet"


def merge_shards(plan: RowAttributionPlan, shard_manifests: List[dict], out_dir: Path,
                 shard_dirs: Optional[List[Path]] = None) -> dict:
    """Write ``out_dir/row_attribution.parquet`` (example_id, split, file, line, row_hash, tags, text, and per
    method ``score_<m>``, ``rank_<m>``; rank 1 = most harmful; the file's ``verifily`` metadata names each
    method's family and the target); returns a manifest naming the default method of each family.

    ``shard_dirs``: where each shard's file is (default: each manifest's ``dir``).
    """
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs = shard_dirs if shard_dirs is not None else [m["dir"] for m in shard_manifests]
    parts = [pd.read_parquet(Path(d) / m["file"]) for m, d in zip(shard_manifests, dirs)]
    shards = pd.concat([p for p in parts if len(p)] or parts[:1],  # a shard past the last batch holds no rows
                       ignore_index=True).sort_values("index", kind="stable").reset_index(drop=True)
    if list(shards["index"]) != list(range(plan.train_rows)):
        raise ValueError(f"the shards cover {len(shards)} rows, not the {plan.train_rows} train rows, once each")
    columns = ["example_id", "split", "line", "row_hash", "tags", "text", "reference", "label"]
    rows = pq.read_table(Path(plan.tokenized_dir) / "train.parquet", columns=columns).to_pandas()
    frame = rows[["example_id", "split"]].copy()
    frame["file"] = _files(Path(plan.run_path), rows)
    for name in ("line", "row_hash", "tags", "text", "reference"):
        frame[name] = rows[name]
    losses = np.stack(shards["losses"].to_numpy())
    scores = {"tracin": shards["tracin"].to_numpy(), "tracin_adam": shards["tracin_adam"].to_numpy(),
              "self_influence": shards["self_influence"].to_numpy(),
              "loss": losses[:, -1], "loss_mean": losses.mean(axis=1)}
    if "label_issue" in plan.methods:
        scores["label_issue"] = label_issue_scores(rows["label"].to_numpy(), np.stack(shards["probs"].to_numpy()))
    for method in plan.methods:
        frame[f"score_{method}"] = scores[method]
        # rank 1 = the most harmful; ties by file order, so ranks are a permutation
        frame[f"rank_{method}"] = pd.Series(-scores[method]).rank(method="first").astype(int).to_numpy()
    for k, snapshot in enumerate(plan.snapshots):
        frame[f"loss_step_{snapshot['step']}"] = losses[:, k]  # the loss dynamics over the snapshots
    families = family_record(plan)
    _write_parquet(frame, out_dir / RESULT_FILE, families)
    default = DEFAULT_METHOD if DEFAULT_METHOD in plan.methods else plan.methods[0]
    return {"step": "merge", "file": RESULT_FILE, "rows": len(frame), "methods": list(plan.methods),
            "default_method": default, "families": families, "target": plan.target,
            "target_split": plan.target_split, "checkpoints": len(plan.snapshots),
            "projection_dim": plan.projection_dim, "seed": plan.seed, "notes": list(plan.notes),
            "orientation": "higher score = more harmful; rank 1 = the most harmful row",
            "seconds": round(time.perf_counter() - started, 3)}


def label_issue_scores(labels, pred_probs):
    """1 - cleanlab's self-confidence label quality of each row (higher = more likely mislabelled)."""
    import numpy as np
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(np.asarray(labels, dtype=int), np.asarray(pred_probs, dtype=float),
                                       method="self_confidence")
    return 1.0 - quality


def _files(run: Path, rows) -> List[Optional[str]]:
    """Each train row's source file (relative to its dataset version), from run.json's dataset record."""
    try:
        record = json.loads((run / "run.json").read_text(encoding="utf-8"))
        files = [f for f in record["job"]["dataset_version"].get("files", []) if f.get("split") == "train"]
    except (OSError, ValueError, KeyError, AttributeError):
        files = []
    if not files:
        return [None] * len(rows)
    out, current, seen, last_line = [], 0, 0, 0
    for line in rows["line"]:
        # lines restart in each file: a line number that does not grow, or a file's rows used up, starts the next
        if seen and (line <= last_line or seen >= files[current].get("num_rows", seen + 1)) and current + 1 < len(files):
            current, seen = current + 1, 0
        out.append(files[current]["path"])
        seen, last_line = seen + 1, line
    return out


def family_record(plan: RowAttributionPlan) -> dict:
    """Per family, its methods in this call and its default: what ``verifily`` metadata and the manifest record."""
    out = {}
    for family, default in ((SUSPECT, DEFAULT_METHOD), (ATTRIBUTION, DEFAULT_ATTRIBUTION)):
        methods = [m for m in plan.methods if FAMILIES[m] == family]
        if not methods:
            continue
        entry = {"methods": methods, "default": default if default in methods else methods[0]}
        if family == ATTRIBUTION:
            entry.update(target=plan.target, target_split=plan.target_split)
        else:
            entry["target"] = None  # these scores read no target rows
        if "label_issue" in methods:
            entry["label_issue"] = LABEL_ISSUE_FOLDS
        out[family] = entry
    return out


def _write_parquet(frame, path: Path, families: dict) -> None:
    """The table with its families in the schema metadata (``verifily``), so the file says what each score is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"verifily"] = json.dumps({"families": families, "method_family": {
        m: f for f, e in families.items() for m in e["methods"]},
        "orientation": "higher score = more harmful (or more suspect); rank 1 = the most harmful row"},
        sort_keys=True).encode("utf-8")
    pq.write_table(table.replace_schema_metadata(meta), path)


def read_families(path: Path) -> dict:
    """The ``verifily`` metadata of a ``row_attribution.parquet`` (empty for a file written before it had any)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[b"verifily"]) if b"verifily" in meta else {}


def summarize_by_tag(table, method: str, tag: str) -> List[dict]:
    """Per value of tag ``tag``: rows, sum and mean of ``score_<method>``, and its **excess**; point values.

    The excess is the sum over the value's rows of (score - the mean score of every train row), so values
    compare against as many average rows; positive = the value's rows score above average. For an
    attribution score (TracIn) that is, to first order, what removing those rows does against removing as
    many average rows, the comparison a tag-level verdict makes; for a suspect-row score (loss-type) it says
    how suspect the value's rows are and nothing about what removing them does. ``excess = n (1 - n/N)
    (mean of the value - mean of the other rows)``. No interval: resampling rows of one trained model carries
    no training variance, so it would not be evidence about the data; the variance across retrained seeds
    is what ``--verify`` and the tag-level call (``--by``) measure."""
    import numpy as np

    values = [json.loads(t).get(tag) for t in table["tags"]]
    scores = table[f"score_{method}"].to_numpy(dtype=float)
    out = []
    for value in sorted({v for v in values if v is not None}):
        chosen = np.array([v == value for v in values])
        mine = scores[chosen]
        n = len(mine)
        out.append({"value": value, "rows": int(n), "sum": float(mine.sum()), "mean": float(mine.mean()),
                    "excess": float(mine.sum() - n * scores.mean())})
    return out


def attribute_rows(plan: RowAttributionPlan, out_dir: Path, shard_count: int = 1) -> dict:
    """Every step in this process, into ``out_dir/{target,shard-<i>,merged}``; returns the merge manifest."""
    out_dir = Path(out_dir)
    target = target_gradients(plan, out_dir / "target")
    shard_dirs = [out_dir / f"shard-{i}" for i in range(shard_count)]
    shards = [score_shard(plan, target, i, shard_count, d, target_dir=out_dir / "target") for i, d in enumerate(shard_dirs)]
    return dict(merge_shards(plan, shards, out_dir / "merged", shard_dirs=shard_dirs), dir=str(out_dir / "merged"))
