"""The N worst test examples with their tags (spec §9.2), and which tag value dominates them."""

from __future__ import annotations

import json
from collections import Counter
from typing import List, Optional

HARD_VERSION = "hard/1"


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
    headline = hard_example_headline(examples, tag_keys, len(frame))
    return {"stage": "hard_examples", "version": HARD_VERSION, "examples": examples, "headline": headline}


def hard_example_headline(examples: List[dict], tag_keys: List[str], total: int) -> Optional[str]:
    """E.g. "7 of the 10 hardest examples come from source:ai_contaminated (20% of the test set)"."""
    if not examples:
        return None
    keys = tag_keys or sorted({k for e in examples for k in e["tags"]})
    best = None
    for key in keys:
        counts = Counter(e["tags"].get(key) for e in examples if e["tags"].get(key) is not None)
        if counts:
            value, count = counts.most_common(1)[0]
            if best is None or count > best[2]:
                best = (key, value, count)
    if best is None:
        return f"the {len(examples)} hardest examples carry no tags"
    key, value, count = best
    return f"{count} of the {len(examples)} hardest examples come from {key}:{value}"
