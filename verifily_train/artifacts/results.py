"""Flat rows of a comparison and of an attribution: what the Python API's DataFrames and the trackers' metrics read."""

from __future__ import annotations

from typing import Any, Dict, List


def _flips(entry: dict) -> dict:
    flips = entry.get("flips")
    return {"wrong_to_right": flips["wrong_to_right"], "right_to_wrong": flips["right_to_wrong"]} if flips else {}


def comparison_cells(result: dict) -> List[Dict[str, Any]]:
    """One row per metric overall (``key`` ``overall``: a, b, delta) and per tag key, value and metric (n, delta,
    flips), each with its paired 95% interval, p, adjusted p and star as ``verifily compare`` computed them."""
    paired = (result.get("paired") or {}).get("deltas") or {}
    rows: List[Dict[str, Any]] = []
    for metric, cell in (result.get("overall") or {}).items():
        rows.append(_cell_row({"key": "overall", "value": None, "metric": metric, "a": cell.get("a"),
                               "b": cell.get("b"), "delta": cell.get("delta")}, paired.get(metric) or {}))
    for key, values in (result.get("slices") or {}).items():
        for value, entry in values.items():
            for metric, cell in (entry.get("deltas") or {}).items():
                rows.append(_cell_row({"key": key, "value": value, "n": entry.get("n"), **_flips(entry),
                                       "metric": metric, "delta": cell.get("delta")}, cell))
    return rows


def _cell_row(row: dict, tested: dict) -> dict:
    low, high = tested.get("ci95") or (None, None)
    return dict(row, ci95_low=low, ci95_high=high, p=tested.get("p"), p_adjusted=tested.get("p_adjusted"),
                significant=bool(tested.get("significant", False)))


def attribution_verdicts(result: dict) -> List[Dict[str, Any]]:
    """One row per removed value: rows removed, verdict, the effect against random removal on the target with its
    interval, the adjusted p, the distribution-free rank p over its control runs, the smallest detectable effect
    and the verdict in words."""
    metric = result.get("primary_metric")
    rows = []
    for value, entry in (result.get("values") or {}).items():
        cell = ((entry.get("slices") or {}).get(entry.get("verdict_slice")) or {}).get(metric) or {}
        low, high = cell.get("ci95") or (None, None)
        rows.append({"value": value, "removed_rows": entry.get("removed_rows"), "verdict": entry.get("verdict"),
                     "metric": metric, "effect": cell.get("effect"), "ci95_low": low, "ci95_high": high,
                     "p_adjusted": entry.get("p_adjusted"), "rank_p": cell.get("rank_p"),
                     "control_runs": cell.get("control_runs"), "mde": cell.get("mde"), "why": entry.get("why")})
    return rows
