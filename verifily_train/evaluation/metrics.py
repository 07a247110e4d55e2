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
    """Accuracy, and macro-F1 over the labels present in ``true`` or ``pred`` (a label in neither is left out)."""
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
        out = sft_metrics(frame["loss_sum"].to_numpy(), frame["n_tokens"].to_numpy())
        for name, column in (("exact_match", "exact_match"), ("token_f1", "token_f1"),
                             ("format_compliance", "format_ok")):
            if column in frame and len(frame):
                out[name] = float(frame[column].mean())
        return out
    return classification_metrics(frame["label_id"].to_numpy(), frame["pred_id"].to_numpy(), labels)


def classification_report(true: Sequence[int], pred: Sequence[int], labels: List[str]) -> dict:
    """Per-class precision, recall, F1 and support, and the confusion matrix (rows: true, columns: predicted)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(true, pred, labels=ids, zero_division=0)
    return {
        "labels": list(labels),
        "per_class": {labels[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                  "support": int(support[i])} for i in ids},
        "confusion_matrix": confusion_matrix(true, pred, labels=ids).tolist(),
    }


# Metrics where lower is better; every other metric is higher-is-better.
LOWER_IS_BETTER = {"loss", "perplexity"}
