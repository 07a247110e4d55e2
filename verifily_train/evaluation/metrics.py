"""Task metrics computed from per-example scores (a predictions table), so slices reuse the same code."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np


def sft_metrics(loss_sum: np.ndarray, n_tokens: np.ndarray) -> Dict[str, float]:
    """Token-weighted loss over the response tokens, and its perplexity."""
    tokens = float(n_tokens.sum())
    loss = float(loss_sum.sum() / tokens) if tokens > 0 else float("nan")
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))) if math.isfinite(loss) else float("nan"),
            "examples": int(len(loss_sum)), "tokens": int(tokens)}


def classification_metrics(true: Sequence[int], pred: Sequence[int], labels: List[str]) -> Dict[str, float]:
    """Accuracy and macro-F1 over every label of the train split (absent labels count as F1 0)."""
    from sklearn.metrics import accuracy_score, f1_score

    true = np.asarray(true)
    pred = np.asarray(pred)
    if len(true) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "examples": 0}
    present = sorted(set(true.tolist()) | set(pred.tolist()))
    return {
        "accuracy": float(accuracy_score(true, pred)),
        "macro_f1": float(f1_score(true, pred, labels=present, average="macro", zero_division=0)),
        "examples": int(len(true)),
    }


def metrics_for_frame(task: str, frame, labels: List[str]) -> Dict[str, float]:
    """Metrics of a predictions frame (all rows, or one slice)."""
    if task == "sft":
        return sft_metrics(frame["loss_sum"].to_numpy(), frame["n_tokens"].to_numpy())
    return classification_metrics(frame["label_id"].to_numpy(), frame["pred_id"].to_numpy(), labels)


# Metrics where lower is better; every other metric is higher-is-better.
LOWER_IS_BETTER = {"loss", "perplexity"}
