"""The N worst test examples with their tags (spec §9.2), and which tag values are over-represented."""

from __future__ import annotations

import json
from typing import Dict, List, Optional

import numpy as np

FDR_Q = 0.10  # Benjamini–Hochberg level over every value of every key tested (conventions: q = 0.10)
MIN_HARD_SUPPORT = 5  # hard rows a value needs before it can headline: a one-row value is never a finding
UNTAGGED = "(untagged)"  # rows without the key (or with null) count as their own value; never headlines


def rank_hardest(task: str, frame):
    """SFT: lowest token F1 first, ties by highest loss (loss alone without generation);
    classification: lowest true-label probability first."""
    if task == "sft" and "token_f1" in frame:
        return frame.sort_values(["token_f1", "loss", "example_id"], ascending=[True, False, True], kind="stable")
    if task == "sft":
        return frame.sort_values(["loss", "example_id"], ascending=[False, True], kind="stable")
    return frame.sort_values(["prob_true", "example_id"], ascending=[True, True], kind="stable")


def answered_imperfectly(task: str, frame):
    """The rows that can be hard examples: for SFT with generation, those whose answer is not an exact match."""
    if task == "sft" and "exact_match" in frame:
        return frame[frame["exact_match"] < 1.0]
    return frame


def mine_hard_examples(task: str, frame, n: int, tag_keys: List[str], q: float = FDR_Q) -> dict:
    """The ``n`` hardest examples with tags, input, reference and prediction, plus per-tag lift and a headline.

    An SFT row answered exactly (``exact_match`` 1) is never a hard example, however many rows are asked for:
    with fewer than ``n`` imperfect answers the list is shorter. The lift still compares with every row."""
    ranked = rank_hardest(task, answered_imperfectly(task, frame)).head(n)
    examples = []
    for rank, row in enumerate(ranked.itertuples(index=False), start=1):
        item = {"rank": rank, "example_id": row.example_id, "split": row.split, "line": int(row.line),
                "tags": json.loads(row.tags), "input": row.text, "reference": row.reference}
        if getattr(row, "row_hash", None):  # finds the row itself (its own fields for the report)
            item["row_hash"] = row.row_hash
        if task == "classification":
            item.update(prediction=row.predicted, prob_true=float(row.prob_true),
                        prob_predicted=float(row.prob_predicted))
        else:
            item.update(loss=float(row.loss), prediction=getattr(row, "prediction", None))
            if hasattr(row, "token_f1"):
                item.update(token_f1=float(row.token_f1), exact_match=float(row.exact_match))
        examples.append(item)
    lift = tag_lift(frame, ranked, tag_keys, q)
    return {"examples": examples, "lift": lift, "headline": lift_headline(lift, len(examples), q)}


def _value_counts(column) -> Dict[object, int]:
    """Rows per tag value, missing and null tags counted as ``(untagged)``."""
    values = column.astype(object).where(column.notna(), UNTAGGED)
    return {value: int(count) for value, count in values.value_counts(sort=False).items()}


def tag_lift(frame, hard, tag_keys: List[str], q: float = FDR_Q) -> Dict[str, list]:
    """Per tag key and value: hard and test counts and shares (over all rows), lift, and a one-sided
    hypergeometric p with its Benjamini–Hochberg q-value over all values of all keys."""
    from scipy import stats  # scipy.stats takes a second to import: only when the test runs (replay never does)

    out: Dict[str, list] = {}
    n_test, n_hard = len(frame), len(hard)
    if n_hard == 0:
        return out
    keys = tag_keys or sorted(c[len("tag."):] for c in frame.columns if c.startswith("tag."))
    for key in keys:
        column = f"tag.{key}"
        if column not in frame:
            continue
        test_counts, hard_counts = _value_counts(frame[column]), _value_counts(hard[column])
        rows = []
        for value, test_count in test_counts.items():
            hard_count = hard_counts.get(value, 0)
            hard_share, test_share = hard_count / n_hard, test_count / n_test
            # P(X >= hard_count) when n_hard rows are drawn from the test set without regard to tags
            p_value = float(stats.hypergeom.sf(hard_count - 1, n_test, test_count, n_hard))
            rows.append({"value": value, "hard_count": hard_count, "test_count": test_count,
                         "hard_share": hard_share, "test_share": test_share, "lift": hard_share / test_share,
                         "p_value": p_value})
        out[key] = rows
    tested = [row for rows in out.values() for row in rows]
    if tested:
        adjusted = stats.false_discovery_control(np.array([r["p_value"] for r in tested]), method="bh")
        for row, q_value in zip(tested, adjusted):
            row.update(q_value=float(q_value), significant=bool(q_value <= q))
    for key, rows in out.items():
        out[key] = sorted(rows, key=lambda r: (-r["lift"], r["p_value"], str(r["value"])))
    return out


def _can_headline(row: dict) -> bool:
    return row["significant"] and row["hard_count"] >= MIN_HARD_SUPPORT and row["value"] != UNTAGGED


def _level(q: float) -> str:
    """The FDR level as printed: 0.10, 0.05; 1.0e-04 below a hundredth."""
    return f"{q:.2f}" if q >= 0.01 else f"{q:.1e}"


def lift_headline(lift: Dict[str, list], n: int, q: float = FDR_Q) -> Optional[str]:
    """E.g. "62% of hard examples come from source:ai_contaminated, 16% of the test set (3.9x,
    hypergeometric p=3.1e-08; Benjamini–Hochberg, FDR 0.10)": the largest lift among significant values with support."""
    if n == 0:
        return None
    if not lift:
        return f"the {n} hardest examples carry no tags"
    candidates = [(key, row) for key, rows in lift.items() for row in rows if _can_headline(row)]
    if not candidates:
        return f"no tag value is over-represented among the {n} hardest examples (Benjamini–Hochberg, FDR {_level(q)})"
    key, row = min(candidates, key=lambda c: (-c[1]["lift"], c[1]["p_value"], c[0], str(c[1]["value"])))
    return (f"{row['hard_share']:.0%} of hard examples come from {key}:{row['value']}, "
            f"{row['test_share']:.0%} of the test set ({row['lift']:.1f}x, "
            f"hypergeometric p={row['p_value']:.2g}; Benjamini–Hochberg, FDR {_level(q)})")
