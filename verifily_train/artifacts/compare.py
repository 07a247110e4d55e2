"""``verifily compare A B`` (spec §9.3): overall and per-slice deltas on the shared test examples, with paired
bootstrap intervals, paired tests under one Benjamini–Hochberg correction, flipped examples, the dataset
diff from per-row hashes, the config diff, and what else makes the two runs less comparable.

One run per side answers "do these two models differ on these test rows?" (model level, said as such);
whether the data or config change caused it needs replicate runs per side: ``artifacts/groups.py``."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple


from verifily_train.artifacts.comparability import comparability_caveats, run_facts
from verifily_train.artifacts.run import load_run_json
from verifily_train.config.schema import EvalSection
from verifily_train.errors import ConfigError, RunError
from verifily_train.evaluation.bootstrap import paired_delta_intervals
from verifily_train.evaluation.significance import SAME_TEST_AS, mark_discoveries, paired_tests

CAVEAT = "Correlation, not causation. For causal attribution: verifily attribute RUN --by <tag>."
PAIRED_SEED = 20260208
PERMUTATIONS = 9999  # random swaps per non-0/1 metric cell: p-values down to 1e-4 (exact when 2**n is fewer)
TEST_NAME = "paired swap test (A/B swapped per row; exact McNemar for 0/1 metrics)"
MODEL_QUESTION = "do these two models (A and B) differ on these test rows?"
SEED_NOTE = ("These stars are about the two models, not about what changed between them: two runs that differ only "
             "in their seed differ like this too. For the change (data or config), train replicates (verifily train "
             "--seeds 5) and compare the groups (verifily compare GROUP_A GROUP_B).")


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


def resolve_fdr_q(fdr_q: Optional[float], record_a: dict, record_b: dict) -> float:
    """``--fdr-q`` when given, else the runs' ``eval.fdr_q`` (the smaller if they differ), else the default."""
    if fdr_q is None:
        recorded = [((r.get("job") or {}).get("config") or {}).get("eval", {}).get("fdr_q") for r in (record_a, record_b)]
        recorded = [q for q in recorded if isinstance(q, (int, float))]
        fdr_q = min(recorded) if recorded else EvalSection.fdr_q
    if isinstance(fdr_q, bool) or not isinstance(fdr_q, (int, float)) or not 0.0 < float(fdr_q) < 1.0:
        raise ConfigError("verifily compare", "--fdr-q", f"must be a number between 0 and 1 (exclusive); got {fdr_q!r}")
    return float(fdr_q)


def _paired_cells(task: str, pa, pb, labels: List[str], bootstrap_samples: int, permutations: int,
                  seed: int) -> Tuple[Dict[str, dict], Dict[str, object]]:
    """Per metric on aligned rows: A, B, B - A and the paired bootstrap interval; and each metric's swap test."""
    cells = paired_delta_intervals(task, pa, pb, labels, max(bootstrap_samples, 1), seed)
    if bootstrap_samples <= 0:
        for cell in cells.values():
            cell["ci95"], cell["excludes_zero"] = None, None
    return cells, paired_tests(task, pa, pb, labels, permutations, seed)


def _flips(ca, cb) -> dict:
    return {"right_to_wrong": int((ca & ~cb).sum()), "wrong_to_right": int((~ca & cb).sum())}


def _test_cells(tested: List[Tuple[str, dict, object, Optional[str]]], q: float) -> dict:
    """Row-level p-values (the exact question "do these two models differ on these rows?"), one BH over all."""
    for metric, cell, test, key in tested:
        cell.update(null_sd=test.null_sd, p=test.pvalue())
    discoveries = mark_discoveries([cell for _, cell, _, _ in tested], q)
    return {"method": "benjamini-hochberg", "q": q, "cells": len(tested), "discoveries": discoveries,
            "test": TEST_NAME, "question": MODEL_QUESTION}


def _paired_comparison(task: str, pred_a, pred_b, labels: List[str], bootstrap_samples: int, permutations: int,
                       q: float) -> Tuple[dict, dict, dict]:
    """Overall and per-slice cells on the shared rows, with one BH correction over every tested cell."""
    pa, pb = _pair(pred_a, pred_b)
    overall, tests = _paired_cells(task, pa, pb, labels, bootstrap_samples, permutations, PAIRED_SEED)
    tested = [(m, overall[m], t, None) for m, t in tests.items() if m in overall]
    paired = {"shared_examples": int(len(pa)), "rows_a": int(len(pred_a)), "rows_b": int(len(pred_b)),
              "deltas": overall}
    ca, cb = _correct(pa, task), _correct(pb, task)
    if ca is not None:
        paired["flips"] = _flips(ca, cb)
    slices: Dict[str, dict] = {}
    for column in sorted(c for c in pa.columns if c.startswith("tag.")):
        key = column[len("tag."):]
        slices[key] = {}
        for value in sorted(pa[column].dropna().unique()):
            mask = (pa[column] == value).to_numpy()
            deltas, tests = _paired_cells(task, pa[mask].reset_index(drop=True), pb[mask].reset_index(drop=True),
                                          labels, bootstrap_samples, permutations,
                                          PAIRED_SEED + len(slices) * 100 + len(slices[key]))
            tested += [(m, deltas[m], t, key) for m, t in tests.items() if m in deltas]
            entry = {"n": int(mask.sum()), "deltas": deltas}
            if ca is not None:
                entry["flips"] = _flips(ca[mask], cb[mask])
            slices[key][value] = entry
    fdr = _test_cells(tested, q)
    fdr["permutations"] = permutations
    for family in [overall] + [e["deltas"] for values in slices.values() for e in values.values()]:
        for cell in family.values():
            cell.setdefault("p", None)
            cell.setdefault("significant", False)
        for name, tested_as in SAME_TEST_AS.items():
            if name in family and tested_as in family:
                family[name].update({k: family[tested_as].get(k) for k in ("null_sd", "p", "p_adjusted",
                                                                           "significant")}, same_test_as=tested_as)
    return paired, slices, fdr


def _unpaired_slices(run_a: Path, run_b: Path) -> Dict[str, dict]:
    """Slice deltas from each run's slices.json (whole runs; no interval, nothing tested)."""
    sa = json.loads((run_a / "slices.json").read_text()).get("slices", {}) if (run_a / "slices.json").is_file() else {}
    sb = json.loads((run_b / "slices.json").read_text()).get("slices", {}) if (run_b / "slices.json").is_file() else {}
    slices: Dict[str, dict] = {}
    for key in sorted(set(sa) & set(sb)):
        va = {e["value"]: e for e in sa[key]["values"]}
        vb = {e["value"]: e for e in sb[key]["values"]}
        slices[key] = {v: {"n": (vb.get(v) or {}).get("n", 0), "deltas": {
            m: {"delta": _delta((va.get(v) or {}).get("metrics", {}).get(m), (vb.get(v) or {}).get("metrics", {}).get(m)),
                "ci95": None, "excludes_zero": None, "p": None, "p_adjusted": None, "significant": False}
            for m in (vb.get(v) or {}).get("metrics", {}) if m not in ("examples", "tokens")}}
            for v in sorted(set(va) | set(vb))}
    return slices


def _run_metrics(a: dict, b: dict, skip) -> Dict[str, dict]:
    ma, mb = a.get("metrics", {}), b.get("metrics", {})
    return {k: {"a": ma[k], "b": mb[k], "delta": _delta(ma[k], mb[k])} for k in sorted(set(ma) & set(mb))
            if k not in skip and isinstance(ma[k], (int, float)) and isinstance(mb[k], (int, float))}


def compare_runs(run_a: Path, run_b: Path, bootstrap_samples: int = 1000, fdr_q: Optional[float] = None,
                 permutations: int = PERMUTATIONS) -> dict:
    """B minus A, overall and per slice, on the runs' shared test rows, with paired intervals, paired tests
    and one Benjamini–Hochberg correction over every slice x metric cell; plus what makes the runs less
    comparable."""
    run_a, run_b = Path(run_a), Path(run_b)
    a, b = load_run_json(run_a), load_run_json(run_b)
    task_a, task_b = a["job"]["task"], b["job"]["task"]
    if task_a != task_b:
        raise RunError(run_b, None, f"is a {task_b} run and {a['run_id']} is a {task_a} run; only runs of the same task compare")
    task = task_a
    q = resolve_fdr_q(fdr_q, a, b)
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ConfigError("verifily compare", "--permutations", f"must be an integer >= 1; got {permutations!r}")
    labels = json.loads((run_a / "adapter/labels.json").read_text())["labels"] if (run_a / "adapter/labels.json").is_file() else []
    labels_b = json.loads((run_b / "adapter/labels.json").read_text())["labels"] if (run_b / "adapter/labels.json").is_file() else []
    pred_a, pred_b = _read_parquet(run_a / "predictions.parquet"), _read_parquet(run_b / "predictions.parquet")
    pairable = pred_a is not None and pred_b is not None and "row_hash" in pred_a and "row_hash" in pred_b \
        and (task == "sft" or labels == labels_b)
    if pairable:
        paired, slices, fdr = _paired_comparison(task, pred_a, pred_b, labels, bootstrap_samples, permutations, q)
    if pairable and paired["shared_examples"] > 0:
        # A and B on the same rows as the delta: full-set figures of runs with different test rows do not subtract
        overall = {k: {"a": d["a"], "b": d["b"], "delta": d["delta"]} for k, d in paired["deltas"].items()}
    else:
        paired = {"shared_examples": 0, "rows_a": None if pred_a is None else int(len(pred_a)),
                  "rows_b": None if pred_b is None else int(len(pred_b))}
        slices = _unpaired_slices(run_a, run_b)
        fdr = {"method": "benjamini-hochberg", "q": q, "cells": 0, "discoveries": 0, "test": TEST_NAME,
               "permutations": permutations}
        overall = _run_metrics(a, b, skip=())
    return {
        "task": task,
        "run_a": a["run_id"], "run_b": b["run_id"],
        "dataset_a": a["job"]["dataset_version"].get("ref"), "dataset_b": b["job"]["dataset_version"].get("ref"),
        "overall": overall, "run_level": _run_metrics(a, b, skip=set(overall)) if paired["shared_examples"] else {},
        "paired": paired, "slices": slices, "fdr": fdr,
        "comparability": comparability_caveats(run_facts(run_a, a), run_facts(run_b, b)),
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
        text += f" [{ci[0]:+.4f}, {ci[1]:+.4f}]"
    return text + (" *" if d.get("significant") else "")


def _rows_line(paired: dict) -> str:
    shared, rows_a, rows_b = paired["shared_examples"], paired.get("rows_a"), paired.get("rows_b")
    if not shared:
        return "overall (B - A), whole runs: no shared test rows, so nothing is paired or tested:"
    if rows_a == rows_b == shared:
        return f"overall (B - A), paired on {shared} shared test rows (every test row of both runs):"
    return (f"overall (B - A), paired on {shared} shared test rows (A evaluated {rows_a}, B {rows_b}; "
            "A, B and B - A are all on the shared rows):")


def legend(fdr: dict) -> str:
    """The star's meaning: which correction, at which q, over how many cells, against which null."""
    if not fdr.get("cells"):
        return "no slice x metric cell was tested (no shared test rows): no stars."
    return (f"* Benjamini–Hochberg at q={fdr['q']:.2f} over {fdr['cells']} slice × metric cells (overall included): "
            f"the false-discovery rate of the stars is at most q; {fdr['test']} on the shared rows; "
            f"{fdr['discoveries']} starred. [intervals]: paired 95% bootstrap over rows, unadjusted.")


def model_level_title() -> str:
    return f"Question: {MODEL_QUESTION} (A and B differ on these test rows where starred)"


WIDTH = 118  # terminal lines stay under ~120 characters (the legend and the seed note are prose, wrapped by the terminal)
_HEAD = f"  {'metric':<22} {'A':>9} {'B':>9}  B - A [95% CI]"
_SLICE_HEAD = f"  {'value':<16} {'n':>5}  {'metric':<18} {'A':>9} {'B':>9}  {'B - A [95% CI]':<30} flips"


def _clip(text: str, width: int) -> str:
    text = str(text)
    return text if len(text) <= width else text[:width - 3] + "..."


def _wrapped(prefix: str, parts: List[str], indent: str) -> List[str]:
    """``prefix`` then ``parts`` joined by ", ", continued on ``indent``-ed lines at WIDTH."""
    lines, line = [], prefix
    for i, part in enumerate(parts):
        piece = part + ("," if i < len(parts) - 1 else "")
        if line not in (prefix, indent) and len(line) + 1 + len(piece) > WIDTH:
            lines.append(line)
            line = indent + piece
        else:
            line = line + piece if line in (prefix, indent) else f"{line} {piece}"
    return lines + [line]


def _flip_text(flip: Optional[dict]) -> str:
    return f"{flip['wrong_to_right']} up / {flip['right_to_wrong']} down" if flip else "-"


def render_comparison(result: dict, markdown: bool = False) -> str:
    """Plain text (or markdown) tables with metric / A / B / B - A [95% CI] columns, one slice metric per line;
    ``*`` marks a cell whose Benjamini–Hochberg-adjusted p is <= q."""
    lines = [model_level_title(), f"A: {result['run_a']} ({result['dataset_a']})",
             f"B: {result['run_b']} ({result['dataset_b']})"]
    lines += [c["line"] for c in result.get("comparability", [])]
    lines.append("")
    deltas = result["paired"].get("deltas", {})
    lines.append(_rows_line(result["paired"]))
    lines += ["", "| metric | A | B | B - A [95% CI] |", "|---|---|---|---|"] if markdown else [_HEAD]
    for name, entry in result["overall"].items():
        cell = _delta_cell(deltas[name]) if name in deltas else _f(entry["delta"])
        if markdown:
            lines.append(f"| {name} | {_f(entry['a'], False)} | {_f(entry['b'], False)} | {cell} |")
        else:
            lines.append(f"  {_clip(name, 22):<22} {_f(entry['a'], False):>9} {_f(entry['b'], False):>9}  {cell}")
    flips = result["paired"].get("flips")
    if flips:
        lines.append(f"  flipped examples: {flips['wrong_to_right']} wrong->right, {flips['right_to_wrong']} right->wrong")
    if result.get("run_level"):
        lines.append("")
        lines.append("run-level figures (whole runs, not test rows: not paired, not tested):")
        for name, entry in result["run_level"].items():
            lines.append(f"  {_clip(name, 22):<22} {_f(entry['a'], False):>9} {_f(entry['b'], False):>9}  "
                         f"{_f(entry['delta'])}")
    for key, values in result["slices"].items():
        lines.append("")
        lines.append(f"by {key} (B - A, one metric per line):")
        lines += ["", "| value | n | metric | A | B | B - A [95% CI] | flips |", "|---|---|---|---|---|---|---|"] \
            if markdown else [_SLICE_HEAD]
        for value, entry in values.items():
            flip_text = _flip_text(entry.get("flips"))
            for i, (m, d) in enumerate(entry["deltas"].items() or [("-", {})]):
                first = i == 0
                label, n = (str(value), str(entry["n"])) if first else ("", "")
                a, b = _f(d.get("a"), False), _f(d.get("b"), False)
                if markdown:
                    lines.append(f"| {label} | {n} | {m} | {a} | {b} | {_delta_cell(d)} | {flip_text if first else ''} |")
                else:
                    lines.append(f"  {_clip(label, 16):<16} {n:>5}  {_clip(m, 18):<18} {a:>9} {b:>9}  "
                                 f"{_delta_cell(d):<30} {flip_text if first else ''}".rstrip())
    diff = result["dataset_diff"]
    if diff.get("available"):
        lines.append("")
        lines.append("dataset diff (A -> B):")
        for split, d in diff["splits"].items():
            lines.append(f"  {split}: {d['rows_a']} -> {d['rows_b']} rows, +{d['added']} added, -{d['removed']} removed, "
                         f"{d['changed']} changed")
            for key, values in d["by_tag"].items():
                parts = [f"{_clip(v, 40)}: +{c['added']}/-{c['removed']}" for v, c in sorted(values.items())]
                lines += _wrapped(f"    by {key}: ", parts, "      ")
    if result["config_diff"]:
        lines.append("")
        lines.append("config diff (A -> B):")
        for d in result["config_diff"]:
            lines.append(_clip(f"  {d['key']}: {_clip(repr(d['a']), 50)} -> {_clip(repr(d['b']), 50)}", WIDTH))
    lines.append("")
    lines.append(legend(result.get("fdr", {})))
    lines.append(SEED_NOTE)
    lines.append(result["caveat"])
    return "\n".join(lines)
