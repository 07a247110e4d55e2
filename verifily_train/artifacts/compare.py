"""``verifily compare A B`` (spec §9.3): overall and per-slice deltas, paired bootstrap intervals on the
shared test examples, flipped examples, the dataset diff from per-row hashes, and the config diff."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

from verifily_train.artifacts.run import load_run_json
from verifily_train.errors import RunError

CAVEAT = "Correlation, not causation. For causal attribution: verifily attribute RUN --by <tag>."
PAIRED_SEED = 20260208


def _read_parquet(path: Path):
    import pandas as pd

    return pd.read_parquet(path) if path.is_file() else None


def _delta(a, b) -> Optional[float]:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a) and math.isfinite(b):
        return float(b) - float(a)
    return None


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def config_diff(a: dict, b: dict) -> List[dict]:
    """Every resolved-config key whose value differs between the runs."""
    fa, fb = {}, {}
    _flatten("", a, fa)
    _flatten("", b, fb)
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def dataset_diff(rows_a, rows_b) -> dict:
    """Rows added, removed and changed per split and per tag value, from per-row content hashes.

    Added/removed: row hashes present in one version only (as multisets). Changed: rows with the same
    explicit ``id`` in both versions whose content differs (rows without ids can only be added/removed).
    """
    if rows_a is None or rows_b is None:
        return {"available": False}
    out = {"available": True, "splits": {}}
    for split in sorted(set(rows_a["split"]) | set(rows_b["split"])):
        a, b = rows_a[rows_a["split"] == split], rows_b[rows_b["split"] == split]
        count_a, count_b = Counter(a["row_hash"]), Counter(b["row_hash"])
        added, removed = count_b - count_a, count_a - count_b
        explicit_a = {e: h for e, h in zip(a["example_id"], a["row_hash"]) if not str(e).startswith(f"{split}:")}
        explicit_b = {e: h for e, h in zip(b["example_id"], b["row_hash"]) if not str(e).startswith(f"{split}:")}
        changed = sorted(e for e in set(explicit_a) & set(explicit_b) if explicit_a[e] != explicit_b[e])
        by_tag: Dict[str, Dict[str, dict]] = {}
        for frame, counter, kind in ((b, added, "added"), (a, removed, "removed")):
            remaining = Counter(counter)
            for h, tags in zip(frame["row_hash"], frame["tags"]):
                if remaining.get(h, 0) > 0:
                    remaining[h] -= 1
                    for key, value in json.loads(tags).items():
                        by_tag.setdefault(key, {}).setdefault(value, {"added": 0, "removed": 0})[kind] += 1
        out["splits"][split] = {"rows_a": int(len(a)), "rows_b": int(len(b)), "added": int(sum(added.values())),
                                "removed": int(sum(removed.values())), "changed": len(changed), "by_tag": by_tag}
    return out


def _pair(pred_a, pred_b):
    """Inner join of two prediction tables on row hash (duplicates paired by occurrence)."""
    a = pred_a.assign(_occ=pred_a.groupby("row_hash").cumcount())
    b = pred_b.assign(_occ=pred_b.groupby("row_hash").cumcount())
    keys = a[["row_hash", "_occ"]].merge(b[["row_hash", "_occ"]], on=["row_hash", "_occ"])
    a = keys.merge(a, on=["row_hash", "_occ"], how="left")
    b = keys.merge(b, on=["row_hash", "_occ"], how="left")
    return a.reset_index(drop=True), b.reset_index(drop=True)


def _correct(frame, task: str):
    if task == "classification":
        return frame["correct"].astype(bool)
    if "exact_match" in frame:
        return frame["exact_match"] >= 1.0
    return None


def compare_runs(run_a: Path, run_b: Path, bootstrap_samples: int = 1000) -> dict:
    """B minus A, overall and per slice, with paired intervals where the runs share test rows."""
    from verifily_train.evaluation.bootstrap import paired_delta_intervals

    run_a, run_b = Path(run_a), Path(run_b)
    a, b = load_run_json(run_a), load_run_json(run_b)
    task_a, task_b = a["job"]["task"], b["job"]["task"]
    if task_a != task_b:
        raise RunError(run_b, None, f"is a {task_b} run and {a['run_id']} is a {task_a} run; only runs of the same task compare")
    task = task_a
    overall = {k: {"a": a["metrics"][k], "b": b["metrics"][k], "delta": _delta(a["metrics"][k], b["metrics"][k])}
               for k in sorted(set(a.get("metrics", {})) & set(b.get("metrics", {})))
               if isinstance(a["metrics"][k], (int, float)) and isinstance(b["metrics"][k], (int, float))}
    labels = json.loads((run_a / "adapter/labels.json").read_text())["labels"] if (run_a / "adapter/labels.json").is_file() else []
    labels_b = json.loads((run_b / "adapter/labels.json").read_text())["labels"] if (run_b / "adapter/labels.json").is_file() else []
    pred_a, pred_b = _read_parquet(run_a / "predictions.parquet"), _read_parquet(run_b / "predictions.parquet")
    paired: dict = {"shared_examples": 0}
    slices: Dict[str, dict] = {}
    if pred_a is not None and pred_b is not None and "row_hash" in pred_a and "row_hash" in pred_b \
            and (task == "sft" or labels == labels_b):
        pa, pb = _pair(pred_a, pred_b)
        paired = {"shared_examples": int(len(pa)),
                  "deltas": paired_delta_intervals(task, pa, pb, labels, bootstrap_samples, PAIRED_SEED)}
        ca, cb = _correct(pa, task), _correct(pb, task)
        if ca is not None:
            paired["flips"] = {"right_to_wrong": int((ca & ~cb).sum()), "wrong_to_right": int((~ca & cb).sum())}
        for column in sorted(c for c in pa.columns if c.startswith("tag.")):
            key = column[len("tag."):]
            slices[key] = {}
            for value in sorted(pa[column].dropna().unique()):
                mask = (pa[column] == value).to_numpy()
                entry = {"n": int(mask.sum()),
                         "deltas": paired_delta_intervals(task, pa[mask].reset_index(drop=True),
                                                          pb[mask].reset_index(drop=True), labels, bootstrap_samples,
                                                          PAIRED_SEED + len(slices) * 100 + len(slices[key]))}
                if ca is not None:
                    entry["flips"] = {"right_to_wrong": int((ca[mask] & ~cb[mask]).sum()),
                                      "wrong_to_right": int((~ca[mask] & cb[mask]).sum())}
                slices[key][value] = entry
    else:  # different test rows: unpaired slice deltas from each run's slices.json
        sa = json.loads((run_a / "slices.json").read_text()).get("slices", {}) if (run_a / "slices.json").is_file() else {}
        sb = json.loads((run_b / "slices.json").read_text()).get("slices", {}) if (run_b / "slices.json").is_file() else {}
        for key in sorted(set(sa) & set(sb)):
            va = {e["value"]: e for e in sa[key]["values"]}
            vb = {e["value"]: e for e in sb[key]["values"]}
            slices[key] = {v: {"n": (vb.get(v) or {}).get("n", 0), "deltas": {
                m: {"delta": _delta((va.get(v) or {}).get("metrics", {}).get(m), (vb.get(v) or {}).get("metrics", {}).get(m)),
                    "ci95": None, "excludes_zero": None}
                for m in (vb.get(v) or {}).get("metrics", {}) if m not in ("examples", "tokens")}}
                for v in sorted(set(va) | set(vb))}
    return {
        "task": task,
        "run_a": a["run_id"], "run_b": b["run_id"],
        "dataset_a": a["job"]["dataset_version"].get("ref"), "dataset_b": b["job"]["dataset_version"].get("ref"),
        "overall": overall, "paired": paired, "slices": slices,
        "dataset_diff": dataset_diff(_read_parquet(run_a / "data_rows.parquet"), _read_parquet(run_b / "data_rows.parquet")),
        "config_diff": config_diff(a["job"]["config"], b["job"]["config"]),
        "caveat": CAVEAT,
    }


def _f(x, signed: bool = True) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:+.4f}" if signed else f"{x:.4f}"
    return str(x)


def _delta_cell(d: dict) -> str:
    text = _f(d.get("delta"))
    ci = d.get("ci95")
    if ci:
        text += f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" + (" *" if d.get("excludes_zero") else "")
    return text


def render_comparison(result: dict, markdown: bool = False) -> str:
    """Plain text (or markdown) tables; ``*`` marks a paired 95% interval that excludes zero."""
    lines = [f"A: {result['run_a']} ({result['dataset_a']})", f"B: {result['run_b']} ({result['dataset_b']})", ""]
    deltas = result["paired"].get("deltas", {})
    lines.append(f"overall (B - A), paired on {result['paired']['shared_examples']} shared test rows:")
    if markdown:
        lines += ["", "| metric | A | B | B - A [95% CI] |", "|---|---|---|---|"]
    for name, entry in result["overall"].items():
        cell = _delta_cell(deltas[name]) if name in deltas else _f(entry["delta"])
        if markdown:
            lines.append(f"| {name} | {_f(entry['a'], False)} | {_f(entry['b'], False)} | {cell} |")
        else:
            lines.append(f"  {name:<26} {_f(entry['a'], False):>12} {_f(entry['b'], False):>12}  {cell}")
    flips = result["paired"].get("flips")
    if flips:
        lines.append(f"  flipped examples: {flips['wrong_to_right']} wrong->right, {flips['right_to_wrong']} right->wrong")
    for key, values in result["slices"].items():
        lines.append("")
        lines.append(f"by {key} (B - A):")
        if markdown:
            lines += ["", "| value | n | deltas | flips |", "|---|---|---|---|"]
        for value, entry in values.items():
            cells = "  ".join(f"{m}={_delta_cell(d)}" for m, d in entry["deltas"].items())
            flip = entry.get("flips")
            flip_text = f"{flip['wrong_to_right']} up / {flip['right_to_wrong']} down" if flip else "-"
            if markdown:
                lines.append(f"| {value} | {entry['n']} | {cells} | {flip_text} |")
            else:
                lines.append(f"  {str(value):<18} n={entry['n']:<5} {cells}  flips: {flip_text}")
    diff = result["dataset_diff"]
    if diff.get("available"):
        lines.append("")
        lines.append("dataset diff (A -> B):")
        for split, d in diff["splits"].items():
            lines.append(f"  {split}: {d['rows_a']} -> {d['rows_b']} rows, +{d['added']} added, -{d['removed']} removed, "
                         f"{d['changed']} changed")
            for key, values in d["by_tag"].items():
                parts = ", ".join(f"{v}: +{c['added']}/-{c['removed']}" for v, c in sorted(values.items()))
                lines.append(f"    by {key}: {parts}")
    if result["config_diff"]:
        lines.append("")
        lines.append("config diff (A -> B):")
        for d in result["config_diff"]:
            lines.append(f"  {d['key']}: {d['a']!r} -> {d['b']!r}")
    lines.append("")
    lines.append("* paired 95% bootstrap interval excludes zero.")
    lines.append(result["caveat"])
    return "\n".join(lines)
