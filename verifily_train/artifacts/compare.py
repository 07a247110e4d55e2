"""``verifily compare A B``: metric deltas between two runs, overall and slice by slice (spec §9.3)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict

from verifily_train.artifacts.run import load_run_json

CAVEAT = "Correlation, not causation. For causal attribution, see v2 roadmap."


def _slices(root: Path) -> dict:
    path = root / "slices.json"
    return json.loads(path.read_text(encoding="utf-8")).get("slices", {}) if path.is_file() else {}


def _delta(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a) and math.isfinite(b):
        return b - a
    return None


def compare_runs(run_a: Path, run_b: Path) -> dict:
    """B minus A for every metric both runs have, overall and per tag value."""
    a, b = load_run_json(run_a), load_run_json(run_b)
    overall = {k: {"a": a["metrics"][k], "b": b["metrics"][k], "delta": _delta(a["metrics"][k], b["metrics"][k])}
               for k in sorted(set(a.get("metrics", {})) & set(b.get("metrics", {})))}
    slices: Dict[str, dict] = {}
    sa, sb = _slices(Path(run_a)), _slices(Path(run_b))
    for key in sorted(set(sa) & set(sb)):
        va = {e["value"]: e for e in sa[key]["values"]}
        vb = {e["value"]: e for e in sb[key]["values"]}
        slices[key] = {}
        for value in sorted(set(va) | set(vb)):
            ea, eb = va.get(value), vb.get(value)
            ma, mb = (ea or {}).get("metrics", {}), (eb or {}).get("metrics", {})
            slices[key][value] = {
                "n_a": (ea or {}).get("n", 0), "n_b": (eb or {}).get("n", 0),
                "metrics": {m: {"a": ma.get(m), "b": mb.get(m), "delta": _delta(ma.get(m), mb.get(m))}
                            for m in sorted(set(ma) | set(mb)) if m not in ("examples", "tokens")},
            }
    return {"run_a": a["run_id"], "run_b": b["run_id"],
            "dataset_a": a["job"]["dataset_version"].get("ref"), "dataset_b": b["job"]["dataset_version"].get("ref"),
            "overall": overall, "slices": slices, "caveat": CAVEAT}


def _f(x) -> str:
    return "-" if x is None else (f"{x:+.4f}" if isinstance(x, float) else str(x))


def render_comparison(result: dict) -> str:
    """A plain-text table of the comparison."""
    lines = [f"A: {result['run_a']} ({result['dataset_a']})", f"B: {result['run_b']} ({result['dataset_b']})", "",
             "overall (B - A):"]
    for name, entry in result["overall"].items():
        if isinstance(entry["a"], (int, float)) and isinstance(entry["b"], (int, float)):
            lines.append(f"  {name:<24} {entry['a']:>12.4f} {entry['b']:>12.4f} {_f(entry['delta']):>10}")
    for key, values in result["slices"].items():
        lines.append(f"\nby {key} (B - A):")
        for value, entry in values.items():
            deltas = "  ".join(f"{m}={_f(v['delta'])}" for m, v in entry["metrics"].items())
            lines.append(f"  {value:<20} n={entry['n_a']}->{entry['n_b']}  {deltas}")
    lines.append("\n" + result["caveat"])
    return "\n".join(lines)
