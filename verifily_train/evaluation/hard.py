"""The N worst test examples with their tags (spec §9.2), and which tag values are over-represented."""

from __future__ import annotations

import json
from collections import Counter
from typing import Dict, List, Optional


def rank_hardest(task: str, frame):
    """SFT: lowest token F1 first, ties by highest loss (loss alone without generation);
    classification: lowest true-label probability first."""
    if task == "sft" and "token_f1" in frame:
        return frame.sort_values(["token_f1", "loss", "example_id"], ascending=[True, False, True], kind="stable")
    if task == "sft":
        return frame.sort_values(["loss", "example_id"], ascending=[False, True], kind="stable")
    return frame.sort_values(["prob_true", "example_id"], ascending=[True, True], kind="stable")


def mine_hard_examples(task: str, frame, n: int, tag_keys: List[str]) -> dict:
    """The ``n`` hardest examples with tags, input, reference and prediction, plus per-tag lift and a headline."""
    ranked = rank_hardest(task, frame).head(n)
    examples = []
    for rank, row in enumerate(ranked.itertuples(index=False), start=1):
        item = {"rank": rank, "example_id": row.example_id, "split": row.split, "line": int(row.line),
                "tags": json.loads(row.tags), "input": row.text, "reference": row.reference}
        if task == "classification":
            item.update(prediction=row.predicted, prob_true=float(row.prob_true),
                        prob_predicted=float(row.prob_predicted))
        else:
            item.update(loss=float(row.loss), prediction=getattr(row, "prediction", None))
            if hasattr(row, "token_f1"):
                item.update(token_f1=float(row.token_f1), exact_match=float(row.exact_match))
        examples.append(item)
    lift = tag_lift(examples, tag_keys, frame)
    return {"examples": examples, "lift": lift, "headline": lift_headline(lift, len(examples))}


def tag_lift(examples: List[dict], tag_keys: List[str], frame) -> Dict[str, list]:
    """For every tag key and value: share among the hard examples, share of the test set, and their ratio."""
    out: Dict[str, list] = {}
    if not examples:
        return out
    keys = tag_keys or sorted({k for e in examples for k in e["tags"]})
    for key in keys:
        column = f"tag.{key}"
        if column not in frame:
            continue
        base = frame[column].value_counts(normalize=True)
        counts = Counter(e["tags"].get(key) for e in examples if e["tags"].get(key) is not None)
        rows = []
        for value in sorted(set(base.index) | set(counts)):
            hard_share = counts.get(value, 0) / len(examples)
            test_share = float(base.get(value, 0.0))
            rows.append({"value": value, "hard_count": counts.get(value, 0), "hard_share": hard_share,
                         "test_share": test_share, "lift": hard_share / test_share if test_share > 0 else None})
        out[key] = sorted(rows, key=lambda r: -(r["lift"] or 0))
    return out


def lift_headline(lift: Dict[str, list], n: int) -> Optional[str]:
    """E.g. "62% of hard examples come from source:ai_contaminated, 16% of the test set (3.9x)"."""
    best = None
    for key, rows in lift.items():
        for row in rows:
            if row["lift"] is not None and row["hard_count"] > 0 and (best is None or row["lift"] > best[1]["lift"]):
                best = (key, row)
    if best is None:
        return None if n == 0 else f"the {n} hardest examples carry no tags"
    key, row = best
    return (f"{row['hard_share']:.0%} of hard examples come from {key}:{row['value']}, "
            f"{row['test_share']:.0%} of the test set ({row['lift']:.1f}x)")
