"""Run groups: replicate runs of one config at consecutive seeds, and ``verifily compare`` of two groups.

A group is written as ``<runs dir>/<group id>/group.json`` with the same discipline as a Run (staged,
checksummed, recorded in the integrity ledger, read-only): the resolved config, the seeds, and each member
run's id and integrity root. Comparing two groups answers the question a single pair of runs cannot: *did
the change from A to B (data or config) move the metric, beyond what a new seed moves?* Each run is one
observation; the per-cell tests are in ``evaluation/replicates.py``.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from verifily_train.artifacts.compare import (config_diff, dataset_diff, resolve_fdr_q, _read_parquet)
from verifily_train.artifacts.run import (find_run, integrity_root, load_run_json, publish_run, runs_dirs,
                                          staging_dir, utc_now, verify_before_use, verify_run, CHECKSUMS)
from verifily_train.config.metricspec import lead_metric
from verifily_train.errors import ConfigError, RunError
from verifily_train.evaluation.bootstrap import statistics_for
from verifily_train.evaluation.replicates import MIN_REPLICATES, describe_power, group_cells
from verifily_train.evaluation.significance import SAME_TEST_AS, mark_discoveries
from verifily_train import jsonsafe
from verifily_train.fsio import atomic_write_json

GROUP_FILE = "group.json"
QUESTION = ("did the change from A to B move each metric on the shared test rows, beyond the spread between "
            "runs that differ only in their seed?")


def new_group_id(now: Optional[datetime] = None) -> str:
    """``group_YYYYMMDD_HHMMSS_<6 hex>`` (UTC), like a run id."""
    now = now or datetime.now(timezone.utc)
    return f"group_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(3)}"


def write_group(runs_dir: Path, config: dict, members: Sequence[dict]) -> dict:
    """Publish the group record of ``members`` (each a run summary with ``run_id``, ``path``, ``seed``)."""
    runs_dir = Path(runs_dir)
    group_id = new_group_id()
    record = {
        "kind": "run_group", "group_id": group_id, "created_at": utc_now(),
        "task": config.get("task"), "dataset_version": config.get("dataset_version"),
        "config": config, "seeds": [int(m["seed"]) for m in members],
        "members": [{"run_id": m["run_id"], "seed": int(m["seed"]),
                     "integrity_root": integrity_root(Path(m["path"]) / CHECKSUMS)} for m in members],
    }
    staging = staging_dir(runs_dir, group_id)
    atomic_write_json(staging / GROUP_FILE, record)
    final = publish_run(staging, runs_dir / group_id)
    return {"group_id": group_id, "path": str(final), "record": record}


def is_group(path: Path) -> bool:
    return (Path(path) / GROUP_FILE).is_file()


def find_group(ref: str, runs_dir: Optional[str | Path] = None) -> Optional[Path]:
    """The group folder ``ref`` names (an id in the runs folders, or a path), else None (and None for a string no
    file system takes: ``find_run`` then names the problem)."""
    if "\x00" in ref or len(ref) > 4096 or any(len(part.encode("utf-8", "replace")) > 255 for part in ref.split("/")):
        return None
    try:
        path = Path(ref)
        if is_group(path):
            return path
        if "/" in ref:
            return None
        for folder in runs_dirs(runs_dir):
            if is_group(folder / ref):
                return folder / ref
    except OSError:  # an unreadable place is not a group
        return None
    return None


def load_group(root: Path) -> dict:
    """The group record, verified: its own checksums, then every member Run (found beside it), each checked
    against the integrity root the group recorded. A changed byte anywhere is one ``RunError``."""
    root = Path(root)
    try:
        verify_run(root, ledger_optional=True)
    except RunError as err:
        raise RunError(err.where, err.key, f"{err.problem}; verifily compare refuses a group that fails "
                                           "`verifily runs verify`") from None
    try:
        record = jsonsafe.loads((root / GROUP_FILE).read_text(encoding="utf-8"))
    except jsonsafe.BadJson as err:
        raise RunError(root / GROUP_FILE, err.key, err.problem) from None
    members = []
    for member in record.get("members", []):
        run = root.parent / member["run_id"]
        if not (run / "run.json").is_file():
            raise RunError(root, None, f"member run {member['run_id']} is missing from {root.parent}/")
        verify_before_use(run, "verifily compare")
        if integrity_root(run / CHECKSUMS) != member["integrity_root"]:
            raise RunError(run / CHECKSUMS, None, f"is not the run group {record['group_id']} recorded (integrity "
                                                  "root differs)")
        members.append(run)
    return dict(record, member_paths=members)


def resolve_side(refs: Sequence[str], runs_dir: Optional[str | Path], flag: str) -> dict:
    """One side of a group comparison from a group id/path, or from run ids/paths (``--a RUN,RUN``)."""
    if len(refs) == 1:
        group = find_group(refs[0], runs_dir)
        if group is not None:
            record = load_group(group)
            return {"group_id": record["group_id"], "runs": record["member_paths"], "seeds": record["seeds"]}
    runs = []
    for ref in refs:
        run = find_run(ref, runs_dir)
        verify_before_use(run, "verifily compare")
        runs.append(run)
    if len(runs) < MIN_REPLICATES:
        raise ConfigError("verifily compare", flag, f"needs a run group or at least {MIN_REPLICATES} runs "
                                                    "(comma-separated) for a seed-level test; got one run")
    if len({r.resolve() for r in runs}) != len(runs):
        raise ConfigError("verifily compare", flag, "names one run twice: each run is one replicate")
    seeds = [int((load_run_json(r).get("job") or {}).get("config", {}).get("seed", -1)) for r in runs]
    return {"group_id": None, "runs": runs, "seeds": seeds}


def _aligned(frames: List) -> List:
    """Each prediction table restricted to the rows every table holds (by row hash; duplicates by occurrence),
    in one order."""
    keyed = [f.assign(_occ=f.groupby("row_hash").cumcount()) for f in frames]
    shared = None
    for f in keyed:
        keys = set(zip(f["row_hash"], f["_occ"]))
        shared = keys if shared is None else shared & keys
    out = []
    for f in keyed:
        mask = [k in shared for k in zip(f["row_hash"], f["_occ"])]
        out.append(f[mask].sort_values(["row_hash", "_occ"]).reset_index(drop=True))
    return out


def _metrics(task: str, frame, labels: List[str], rows: np.ndarray) -> Dict[str, float]:
    """Each tested metric of one run on the given rows (perplexity shares loss's test and is left out)."""
    if len(rows) == 0:
        return {}
    stats = statistics_for(task, frame.iloc[rows].reset_index(drop=True), labels)
    index = np.arange(len(rows))[None, :]
    return {name: float(np.asarray(stat(index))[0]) for name, stat in stats.items() if name not in SAME_TEST_AS}


def compare_groups(side_a: dict, side_b: dict, fdr_q: Optional[float] = None) -> dict:
    """B minus A per slice x metric cell, each run one observation: Welch's t per cell over the runs, one
    Benjamini-Hochberg correction over all cells."""
    records_a = [load_run_json(r) for r in side_a["runs"]]
    records_b = [load_run_json(r) for r in side_b["runs"]]
    tasks = {r["job"]["task"] for r in records_a + records_b}
    if len(tasks) != 1:
        raise RunError(side_b["runs"][0], None, f"the groups mix tasks ({', '.join(sorted(tasks))}); only runs of one "
                                                "task compare")
    task = tasks.pop()
    q = resolve_fdr_q(fdr_q, records_a[0], records_b[0])
    runs = list(side_a["runs"]) + list(side_b["runs"])
    labels = []
    for run in runs:
        path = run / "adapter/labels.json"
        found = json.loads(path.read_text())["labels"] if path.is_file() else []
        if task == "classification" and labels and found != labels:
            raise RunError(run, None, "has another label set than the other runs; classification runs with "
                                      "different labels do not compare")
        labels = labels or found
    frames = []
    for run in runs:
        frame = _read_parquet(run / "predictions.parquet")
        if frame is None or "row_hash" not in frame:
            raise RunError(run, None, "has no predictions.parquet with row hashes: nothing to compare on")
        frames.append(frame)
    frames = _aligned(frames)
    n = len(frames[0])
    if n == 0:
        raise RunError(side_b["runs"][0], None, "shares no test rows with the other runs: nothing to compare")
    cells_rows = {("overall", None): np.arange(n)}
    reference = frames[0]
    for column in sorted(c for c in reference.columns if c.startswith("tag.")):
        for value in sorted(reference[column].dropna().unique(), key=str):
            cells_rows[(column[len("tag."):], value)] = np.nonzero((reference[column] == value).to_numpy())[0]
    per_run = [{cell: _metrics(task, f, labels, rows) for cell, rows in cells_rows.items()} for f in frames]
    n_a, n_b = len(side_a["runs"]), len(side_b["runs"])
    n_cells = sum(len(per_run[0][cell]) for cell in cells_rows)
    overall, slices, tested = {}, {}, []
    for cell, rows in cells_rows.items():
        values_a = {m: [per_run[i][cell][m] for i in range(n_a)] for m in per_run[0][cell]}
        values_b = {m: [per_run[n_a + i][cell][m] for i in range(n_b)] for m in per_run[n_a][cell]}
        tests = group_cells(values_a, values_b, q, n_cells)
        tested += [t for t in tests.values() if t.get("p") is not None]
        if cell[0] == "overall":
            overall = tests
        else:
            slices.setdefault(cell[0], {})[str(cell[1])] = {"n": int(len(rows)), "deltas": tests}
    discoveries = mark_discoveries(tested, q)
    for cells in [overall] + [e["deltas"] for values in slices.values() for e in values.values()]:
        for cell in cells.values():
            cell.setdefault("p_adjusted", None)
            cell.setdefault("significant", False)
    first_a, first_b = records_a[0], records_b[0]
    rows_a, rows_b = _read_parquet(side_a["runs"][0] / "data_rows.parquet"), _read_parquet(side_b["runs"][0] / "data_rows.parquet")
    return {
        "kind": "groups", "task": task, "question": QUESTION,
        "a": _side(side_a, records_a), "b": _side(side_b, records_b),
        "design": _design(side_a["seeds"], side_b["seeds"]),
        "shared_examples": int(n), "overall": overall, "slices": slices,
        "fdr": {"method": "benjamini-hochberg", "q": q, "cells": len(tested), "discoveries": discoveries,
                "test": "Welch t over runs (unequal variances)",
                "mde_level": f"two-sided {q:.2f}/{max(n_cells, 1)} at {int(0.8 * 100)}% power"},
        "power_note": describe_power(n_a, n_b),
        "config_diff": config_diff(_without_seed(first_a["job"]["config"]), _without_seed(first_b["job"]["config"])),
        "dataset_diff": dataset_diff(rows_a, rows_b),
    }


def _design(seeds_a: Sequence[int], seeds_b: Sequence[int]) -> str:
    shared = sorted(set(seeds_a) & set(seeds_b))
    if sorted(seeds_a) == sorted(seeds_b):
        return ("Welch t over runs; both sides trained the same seeds, which Welch treats as independent "
                "(conservative when a shared seed makes the sides alike)")
    if shared:
        return f"Welch t over runs; seeds {', '.join(map(str, shared))} are on both sides"
    return "Welch t over runs (disjoint seeds)"


def _without_seed(config: dict) -> dict:
    out = dict(config)
    out.pop("seed", None)
    return out


def _side(side: dict, records: List[dict]) -> dict:
    refs = sorted({(r.get("job") or {}).get("dataset_version", {}).get("ref") or "?" for r in records})
    return {"group_id": side.get("group_id"), "runs": [r["run_id"] for r in records], "seeds": list(side["seeds"]),
            "dataset": ", ".join(refs)}


def _f(x, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _cell_text(d: dict) -> str:
    text = _f(d.get("delta"), True)
    ci = d.get("ci95")
    if ci:
        text += f" [{ci[0]:+.4f}, {ci[1]:+.4f}]"
    return text + (" *" if d.get("significant") else "")


def _table(cells: Dict[str, dict], lead: str = "  ") -> List[str]:
    rows = [["metric", "A mean", "B mean", "B - A [95% CI over seeds]", "adj. p", "detectable"]]
    for metric, d in cells.items():
        rows.append([metric, _f(d.get("a")), _f(d.get("b")), _cell_text(d),
                     "-" if d.get("p_adjusted") is None else f"{d['p_adjusted']:.3f}",
                     "-" if d.get("mde") is None else f"±{d['mde']:.4f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [lead + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def side_line(name: str, side: dict) -> str:
    who = side["group_id"] or "runs " + ", ".join(side["runs"])
    return f"{name}: {who} ({len(side['runs'])} runs, seeds {', '.join(map(str, side['seeds']))}; {side['dataset']})"


def group_legend(result: dict) -> str:
    fdr = result["fdr"]
    return (f"* Benjamini–Hochberg at q={fdr['q']:.2f} over {fdr['cells']} slice × metric cells: the false-discovery "
            f"rate of the stars (with no real change, the chance of any star) is at most q. Test: {fdr['test']}; "
            f"each run is one observation. [interval]: 95% over seeds, unadjusted. detectable: the smallest |B - A| "
            f"this design finds 80% of the time at level {fdr['q']:.2f}/{fdr['cells']} (a lone discovery).")


def render_group_comparison(result: dict) -> str:
    """Plain-text tables of a group comparison, the question first."""
    lines = [f"Question: {result['question']}", side_line("A", result["a"]), side_line("B", result["b"]),
             f"design: {result['design']} ({result['shared_examples']} shared test rows)"]
    if result.get("power_note"):
        lines.append(f"note: {result['power_note']}")
    lines += ["", "overall:"] + _table(result["overall"])
    for key, values in result["slices"].items():
        for value, entry in values.items():
            lines += ["", f"{key}={value} (n={entry['n']}):"] + _table(entry["deltas"])
    if result["config_diff"]:
        lines += ["", "config diff (A -> B, seed aside):"]
        lines += [f"  {d['key']}: {d['a']!r} -> {d['b']!r}" for d in result["config_diff"]]
    diff = result["dataset_diff"]
    if diff.get("available"):
        lines += ["", "dataset diff (A -> B):"]
        lines += [f"  {s}: {d['rows_a']} -> {d['rows_b']} rows, +{d['added']} added, -{d['removed']} removed, "
                  f"{d['changed']} changed" for s, d in diff["splits"].items()]
    lines += ["", group_legend(result)]
    return "\n".join(lines)


def group_of_run(run: Path) -> Optional[Path]:
    """The newest group beside ``run`` that lists it as a member, else None."""
    run = Path(run)
    found = []
    for folder in run.parent.glob("group_*"):
        if not is_group(folder):
            continue
        try:
            record = jsonsafe.loads((folder / GROUP_FILE).read_text(encoding="utf-8"))
        except (OSError, jsonsafe.BadJson):
            continue
        if any(m.get("run_id") == run.name for m in record.get("members", [])):
            found.append((record.get("created_at", ""), folder))
    return max(found)[1] if found else None


def _bar(delta: float, ci: List[float], scale: float, width: int = 24) -> str:
    """A text picture of B - A with its interval on a symmetric axis: ``[---|==o==---]``."""
    def pos(x):
        return int(round((x / scale + 1) / 2 * (width - 1))) if scale > 0 else width // 2

    chars = [" "] * width
    lo, hi = sorted((pos(ci[0]), pos(ci[1])))
    for i in range(max(lo, 0), min(hi, width - 1) + 1):
        chars[i] = "-"
    chars[width // 2] = "|"
    chars[min(max(pos(delta), 0), width - 1)] = "o"
    return "[" + "".join(chars) + "]"


def render_group_markdown(result: dict) -> str:
    """The group comparison as markdown (the Prefect artifact): question, sides, a text picture of each
    cell's B - A with its seed interval for the lead metric, and the table of every cell."""
    lead = lead_metric(result["overall"])
    cells = [("overall", result["overall"])] + [(f"{k}={v} (n={e['n']})", e["deltas"])
                                                for k, vs in result["slices"].items() for v, e in vs.items()]
    lines = [f"**Question:** {result['question']}", "", f"- {side_line('A', result['a'])}",
             f"- {side_line('B', result['b'])}", f"- design: {result['design']}, {result['shared_examples']} shared "
                                                  "test rows"]
    if result.get("power_note"):
        lines.append(f"- note: {result['power_note']}")
    if lead:
        shown = [(n, c[lead]) for n, c in cells if lead in c and c[lead].get("delta") is not None]
        scale = max([abs(v) for _, d in shown for v in (d.get("ci95") or [d["delta"]])] + [1e-12])
        lines += ["", f"B - A of {lead}, mean over seeds with its 95% interval over seeds (axis ±{scale:.4f}, "
                      "| marks 0, * starred):", "", "```"]
        width = max(len(n) for n, _ in shown)
        lines += [f"{n.ljust(width)} {_bar(d['delta'], d.get('ci95') or [d['delta']] * 2, scale)} "
                  f"{d['delta']:+.4f}{' *' if d.get('significant') else ''}" for n, d in shown]
        lines.append("```")
    lines += ["", "| cell | metric | A mean | B mean | B - A [95% CI over seeds] | adj. p | detectable |",
              "|---|---|---|---|---|---|---|"]
    for name, deltas in cells:
        for metric, d in deltas.items():
            lines.append(f"| {name} | {metric} | {_f(d.get('a'))} | {_f(d.get('b'))} | {_cell_text(d)} | "
                         f"{'-' if d.get('p_adjusted') is None else format(d['p_adjusted'], '.3f')} | "
                         f"{'-' if d.get('mde') is None else '±' + format(d['mde'], '.4f')} |")
    lines += ["", group_legend(result)]
    return "\n".join(lines)
