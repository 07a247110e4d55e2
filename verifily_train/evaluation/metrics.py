"""Task metrics computed from per-example scores (a predictions table), so slices reuse the same code.

Which metrics a task has, and how each aggregates its rows (its ``kind``), is the table in config/metricspec.py;
``POINT`` computes each kind once.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from verifily_train.config.metricspec import (EXP_OF, LABEL_MATCH, MACRO_F1, ROW_MEAN, TOKEN_WEIGHTED, MetricSpec,
                                              metric, metrics_for)


def token_weighted_loss(loss_sum: np.ndarray, n_tokens: np.ndarray) -> float:
    """sum(loss_sum) / sum(n_tokens): the mean loss per response token (nan without tokens)."""
    tokens = float(n_tokens.sum())
    return float(loss_sum.sum() / tokens) if tokens > 0 else float("nan")


def capped_exp(value: float) -> float:
    """exp(min(value, 50)): perplexity from a loss, finite for a diverged one."""
    return float(math.exp(min(value, 50.0))) if math.isfinite(value) else float("nan")


def accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(true, pred)) if len(true) else float("nan")


def macro_f1(true: np.ndarray, pred: np.ndarray) -> float:
    """Macro-F1 over the labels present in ``true`` or ``pred`` (a label in neither is left out)."""
    from sklearn.metrics import f1_score

    if len(true) == 0:
        return float("nan")
    present = sorted(set(true.tolist()) | set(pred.tolist()))
    return float(f1_score(true, pred, labels=present, average="macro", zero_division=0))


def sft_metrics(loss_sum: np.ndarray, n_tokens: np.ndarray) -> Dict[str, float]:
    """Token-weighted loss over the response tokens, and its perplexity."""
    loss = token_weighted_loss(loss_sum, n_tokens)
    return {"loss": loss, "perplexity": capped_exp(loss), "examples": int(len(loss_sum)),
            "tokens": int(float(n_tokens.sum()))}


def classification_metrics(true: Sequence[int], pred: Sequence[int], labels: List[str]) -> Dict[str, float]:
    """Accuracy, and macro-F1 over the labels present in ``true`` or ``pred`` (a label in neither is left out)."""
    true = np.asarray(true)
    pred = np.asarray(pred)
    return {"accuracy": accuracy(true, pred), "macro_f1": macro_f1(true, pred), "examples": int(len(true))}


def _row_mean(spec: MetricSpec, frame, labels: List[str]) -> Optional[float]:
    return float(frame[spec.column].mean()) if spec.column in frame and len(frame) else None


def _label_match(spec: MetricSpec, frame, labels: List[str]) -> float:
    return accuracy(frame["label_id"].to_numpy(), frame["pred_id"].to_numpy())


def _token_weighted(spec: MetricSpec, frame, labels: List[str]) -> float:
    return token_weighted_loss(frame["loss_sum"].to_numpy(), frame["n_tokens"].to_numpy())


def _exp_of(spec: MetricSpec, frame, labels: List[str]) -> Optional[float]:
    inner = point_value(metric(spec.function_of), frame, labels)
    return None if inner is None else capped_exp(inner)


def _macro_f1(spec: MetricSpec, frame, labels: List[str]) -> float:
    return macro_f1(frame["label_id"].to_numpy(), frame["pred_id"].to_numpy())


# a metric's value on a frame, per kind of the metric table (None: the frame cannot give it, e.g. no generation)
POINT: Dict[str, Callable[[MetricSpec, object, List[str]], Optional[float]]] = {
    ROW_MEAN: _row_mean, LABEL_MATCH: _label_match, TOKEN_WEIGHTED: _token_weighted, EXP_OF: _exp_of,
    MACRO_F1: _macro_f1,
}


def point_value(spec: MetricSpec, frame, labels: List[str]) -> Optional[float]:
    return POINT[spec.kind](spec, frame, labels)


def metrics_for_frame(task: str, frame, labels: List[str]) -> Dict[str, float]:
    """Metrics of a predictions frame (all rows, or one slice): every metric of the task the frame gives, in the
    table's order, then ``examples`` (and ``tokens`` where the loss is token-weighted)."""
    out: Dict[str, float] = {}
    specs = metrics_for(task)
    for spec in specs:
        value = point_value(spec, frame, labels)
        if value is not None:
            out[spec.name] = value
    out["examples"] = int(len(frame))
    if any(spec.kind == TOKEN_WEIGHTED for spec in specs):
        out["tokens"] = int(float(frame["n_tokens"].sum()))
    return out


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

