"""Metrics per tag value (spec §9.1): which data segments the model serves well or badly."""

from __future__ import annotations

import math
from typing import Dict, List

from verifily_train.evaluation.metrics import metrics_for_frame

LOW_CONFIDENCE_N = 30  # fewer examples than this: the slice's figures are flagged as noisy


def slice_metrics_by_tag(task: str, frame, labels: List[str], tag_keys: List[str], overall: Dict[str, float],
                         baseline=None) -> dict:
    """For each tag key and value: n, every metric, its delta against the overall figure, and the base model's."""
    out: Dict[str, list] = {}
    for key in tag_keys:
        column = f"tag.{key}"
        rows = []
        values = sorted(frame[column].dropna().unique().tolist()) if column in frame else []
        for value in values:
            part = frame[frame[column] == value]
            metrics = metrics_for_frame(task, part, labels)
            delta = {name: (metrics[name] - overall[name]) for name in metrics
                     if name in overall and name not in ("examples", "tokens")
                     and isinstance(metrics[name], float) and math.isfinite(metrics[name])}
            entry = {"value": value, "n": int(len(part)), "metrics": metrics, "delta": delta,
                     "low_confidence": int(len(part)) < LOW_CONFIDENCE_N}
            if baseline is not None and column in baseline:
                entry["baseline"] = metrics_for_frame(task, baseline[baseline[column] == value], labels)
            rows.append(entry)
        untagged = int(frame[column].isna().sum()) if column in frame else int(len(frame))
        out[key] = {"values": rows, "untagged": untagged}
    return {"stage": "slice", "slices": out,
            "note": "Correlation, not causation: a slice's figures describe the model on those test rows."}
