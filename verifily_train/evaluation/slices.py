"""Metrics per tag value (spec §9.1), each with a seeded 95% bootstrap interval."""

from __future__ import annotations

import math
from typing import Dict, List

from verifily_train.config.metricspec import metric
from verifily_train.evaluation.bootstrap import bootstrap_intervals
from verifily_train.evaluation.metrics import metrics_for_frame

LOW_CONFIDENCE_N = 30  # fewer examples than this: the slice's figures are flagged as noisy


def slice_metrics_by_tag(task: str, frame, labels: List[str], tag_keys: List[str], overall: Dict[str, float],
                         baseline=None, bootstrap_samples: int = 1000, seed: int = 42) -> dict:
    """Overall and, for each tag key and value: n, every metric with its 95% interval, the delta against
    the overall figure, the base model's figures (when evaluated), and a low-confidence flag (n < 30)."""
    out: Dict[str, dict] = {}
    for k, key in enumerate(tag_keys):
        column = f"tag.{key}"
        rows = []
        values = sorted(frame[column].dropna().unique().tolist()) if column in frame else []
        for v, value in enumerate(values):
            part = frame[frame[column] == value]
            metrics = metrics_for_frame(task, part, labels)
            delta = {name: (metrics[name] - overall[name]) for name in metrics
                     if name in overall and metric(name) is not None  # a metric, not a count
                     and isinstance(metrics[name], float) and math.isfinite(metrics[name])}
            entry = {"value": value, "n": int(len(part)), "metrics": metrics, "delta": delta,
                     "ci95": bootstrap_intervals(task, part, labels, bootstrap_samples, seed + 1000 * (k + 1) + v),
                     "low_confidence": int(len(part)) < LOW_CONFIDENCE_N}
            if baseline is not None and column in baseline:
                entry["baseline"] = metrics_for_frame(task, baseline[baseline[column] == value], labels)
            rows.append(entry)
        untagged = int(frame[column].isna().sum()) if column in frame else int(len(frame))
        out[key] = {"values": rows, "untagged": untagged}
    return {"stage": "slice",
            "overall": {"n": int(len(frame)), "metrics": overall,
                        "ci95": bootstrap_intervals(task, frame, labels, bootstrap_samples, seed)},
            "bootstrap": {"samples": bootstrap_samples, "seed": seed, "level": 0.95, "method": "percentile"},
            "slices": out,
            "low_confidence_n": LOW_CONFIDENCE_N,
            "note": "Correlation, not causation: a slice's figures describe the model on those test rows."}
