"""Compare a reproduced Run with the original: bytes of the adapter, metrics, predictions, environment."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

from verifily_train.artifacts.run import load_run_json
from verifily_train.hashing import sha256_file


def _files(root: Path) -> Dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _flatten(prefix: str, value, out: Dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)


def _max_diff(a: Dict[str, float], b: Dict[str, float]) -> tuple:
    worst = ("", 0.0)
    for key in sorted(set(a) & set(b)):
        if math.isfinite(a[key]) and math.isfinite(b[key]):
            diff = abs(a[key] - b[key])
            if diff > worst[1]:
                worst = (key, diff)
    return worst


def compare_reproduction(original: Path, reproduced: Path) -> dict:
    """Everything an auditor needs: which parts match bitwise, and the largest differences where not."""
    import pandas as pd

    a, b = load_run_json(original), load_run_json(reproduced)
    weights = "adapter" if (original / "adapter").is_dir() else "model"
    files_a, files_b = _files(original / weights), _files(reproduced / weights)
    adapter_same = files_a == files_b
    metrics_a, metrics_b = {}, {}
    _flatten("", json.loads((original / "metrics.json").read_text())["eval"], metrics_a)
    _flatten("", json.loads((reproduced / "metrics.json").read_text())["eval"], metrics_b)
    metric_key, metric_diff = _max_diff(metrics_a, metrics_b)
    pred_same, pred_worst = True, ("", 0.0)
    if (original / "predictions.parquet").is_file() and (reproduced / "predictions.parquet").is_file():
        pa_, pb_ = pd.read_parquet(original / "predictions.parquet"), pd.read_parquet(reproduced / "predictions.parquet")
        pred_same = pa_.equals(pb_)
        for column in pa_.select_dtypes("number").columns:
            if column in pb_ and len(pa_) == len(pb_):
                diff = float((pa_[column] - pb_[column]).abs().max()) if len(pa_) else 0.0
                if diff > pred_worst[1]:
                    pred_worst = (column, diff)
    env_a = json.loads((original / "env.json").read_text())
    env_b = json.loads((reproduced / "env.json").read_text())
    flat_a, flat_b = {}, {}
    for src, dst in ((env_a, flat_a), (env_b, flat_b)):
        for k, v in src.items():
            if isinstance(v, dict):
                dst.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                dst[k] = v
    env_changes: List[str] = [f"{k}: {flat_a.get(k)} -> {flat_b.get(k)}" for k in sorted(set(flat_a) | set(flat_b))
                              if flat_a.get(k) != flat_b.get(k)]
    return {
        "original": a["run_id"], "reproduced": b["run_id"],
        "data_hash_matches": a["data_hash"] == b["data_hash"],
        "model_identity_matches": a.get("model_identity") == b.get("model_identity"),
        "config_hash_matches": a["config_hash"] == b["config_hash"],
        "reproducibility_hash_matches": a["reproducibility_hash"] == b["reproducibility_hash"],
        "adapter_bitwise": adapter_same,
        "adapter_files_differing": sorted(k for k in set(files_a) | set(files_b) if files_a.get(k) != files_b.get(k)),
        "metrics_equal": metrics_a == metrics_b, "metrics_max_diff": {"metric": metric_key, "abs": metric_diff},
        "predictions_equal": pred_same, "predictions_max_diff": {"column": pred_worst[0], "abs": pred_worst[1]},
        "env_changes": env_changes,
        "reproduced_exactly": adapter_same and metrics_a == metrics_b and pred_same and a["data_hash"] == b["data_hash"],
    }


def render_reproduction(report: dict) -> str:
    """Plain text an auditor can paste."""
    yes = lambda flag: "yes" if flag else "NO"  # noqa: E731
    lines = [
        f"Reproduction of {report['original']} as {report['reproduced']} (cache off)",
        f"  dataset content hash matches:   {yes(report['data_hash_matches'])}",
        f"  model identity matches:         {yes(report['model_identity_matches'])}",
        f"  config hash matches:            {yes(report['config_hash_matches'])}",
        f"  reproducibility hash matches:   {yes(report['reproducibility_hash_matches'])}",
        f"  adapter weights bitwise equal:  {yes(report['adapter_bitwise'])}"
        + ("" if report["adapter_bitwise"] else f" (differing: {', '.join(report['adapter_files_differing'])})"),
        f"  metrics equal:                  {yes(report['metrics_equal'])}"
        + ("" if report["metrics_equal"] else
           f" (largest difference {report['metrics_max_diff']['abs']:.3g} in {report['metrics_max_diff']['metric']})"),
        f"  predictions equal:              {yes(report['predictions_equal'])}"
        + ("" if report["predictions_equal"] else
           f" (largest difference {report['predictions_max_diff']['abs']:.3g} in {report['predictions_max_diff']['column']})"),
    ]
    if report["env_changes"]:
        lines.append("  environment changes (env.json):")
        lines.extend(f"    {change}" for change in report["env_changes"])
    else:
        lines.append("  environment (env.json): identical")
    lines.append("RESULT: " + ("reproduced exactly" if report["reproduced_exactly"] else "NOT reproduced exactly"))
    return "\n".join(lines)
