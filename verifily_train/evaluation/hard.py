"""The N worst test examples with their tags (spec §9.2), and which tag value dominates them."""

from __future__ import annotations

import json
from collections import Counter
from typing import List, Optional


def mine_hard_examples(task: str, frame, n: int, tag_keys: List[str]) -> dict:
    """Rank by hardness score (SFT: response loss; classification: 1 - p(true label)), hardest first."""
    ranked = frame.sort_values(["score", "example_id"], ascending=[False, True], kind="stable").head(n)
    examples = []
    for rank, row in enumerate(ranked.itertuples(index=False), start=1):
        item = {"rank": rank, "example_id": row.example_id, "split": row.split, "line": int(row.line),
                "score": float(row.score), "tags": json.loads(row.tags), "input": row.text, "reference": row.reference}
        if task == "classification":
            item.update(predicted=row.predicted, label=row.label, prob_true=float(row.prob_true))
        else:
            item.update(loss=float(row.loss))
        examples.append(item)
    headline = hard_example_headline(examples, tag_keys, frame)
    return {"stage": "hard_examples", "examples": examples, "headline": headline}


def hard_example_headline(examples: List[dict], tag_keys: List[str], frame) -> Optional[str]:
    """The tag value most over-represented among the hardest examples, against its share of the test set.

    E.g. "9 of the 20 hardest examples come from source:ai_contaminated (45% vs 20% of evaluated rows)".
    """
    if not examples:
        return None
    keys = tag_keys or sorted({k for e in examples for k in e["tags"]})
    best = None
    for key in keys:
        column = f"tag.{key}"
        if column not in frame:
            continue
        base = frame[column].value_counts(normalize=True)
        counts = Counter(e["tags"].get(key) for e in examples if e["tags"].get(key) is not None)
        for value, count in counts.items():
            share = count / len(examples)
            lift = share / max(float(base.get(value, 0.0)), 1e-9)
            if best is None or (lift, count) > (best[3], best[2]):
                best = (key, value, count, lift, share, float(base.get(value, 0.0)))
    if best is None:
        return f"the {len(examples)} hardest examples carry no tags"
    key, value, count, _, share, base_share = best
    return (f"{count} of the {len(examples)} hardest examples come from {key}:{value} "
            f"({share:.0%} of the hardest vs {base_share:.0%} of evaluated rows)")
