"""Causal attribution by retraining: leave one tag value's train rows out, retrain, measure the effect.

For a parent run and a tag key (``source``), each selected value gets a derived DatasetVersion whose
train split lacks that value's rows (val/test unchanged), recorded in the store with its parent and
rule. Every arm (the full data, and each value removed) is trained with the parent's config for
several seeds; the effect of removing a value on a metric is ``metric(removed) - metric(full)`` on the
same test rows, averaged over seeds, with two intervals: across seeds (Student t) and a paired
bootstrap over test examples (each example's score averaged over seeds first).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from verifily_train.errors import DatasetExistsError, DataError, VerifilyError

FULL = "__full__"  # the arm that keeps every train row
VERDICTS = ("hurts", "helps", "no measurable effect at this budget")


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).strip("-.") or "x"


def derived_version_name(parent_version: str, key: str, value: str) -> str:
    return f"{parent_version}-without-{_safe(key)}-{_safe(value)}"[:128]


def derive_without(dv, key: str, value: str, home: Optional[Path] = None) -> dict:
    """The derived version of ``dv`` without the train rows tagged ``key: value`` (created once, then reused)."""
    from verifily_train.dataset.store import create_version, resolve

    if not dv.split_files("train"):
        raise DataError(dv.manifest_path or dv.data_path, "files", "has no train split to remove rows from")
    kept, removed = [], 0
    for data_file in dv.split_files("train"):
        with open(data_file.abs_path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                row = json.loads(line)
                if str((row.get("tags") or {}).get(key)) == str(value):
                    removed += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
    if removed == 0:
        raise VerifilyError(None, "--values", f"no train rows of {dv.ref} have {key}={value}")
    if not kept:
        raise VerifilyError(None, "--values", f"removing {key}={value} leaves {dv.ref} without train rows")
    dataset_id = dv.dataset_id if dv.dataset_id != "local" else f"local-{dv.content_hash.split(':')[-1][:12]}"
    version = derived_version_name(str(dv.version or "v"), key, value)
    rule = {"drop_train_rows_where_tag": {key: value}}
    derived_from = {"ref": dv.ref, "content_hash": dv.content_hash, "rule": rule}
    with tempfile.TemporaryDirectory(prefix="verifily-derive-") as tmp:
        splits = {"train": Path(tmp) / "train.jsonl"}
        splits["train"].write_text("".join(kept), encoding="utf-8")
        for split in ("val", "test"):  # unchanged rows, in manifest order
            if dv.split_files(split):
                splits[split] = Path(tmp) / f"{split}.jsonl"
                with open(splits[split], "wb") as out:
                    for data_file in dv.split_files(split):
                        data = Path(data_file.abs_path).read_bytes()
                        out.write(data if data.endswith(b"\n") or not data else data + b"\n")
        try:
            child = create_version(dataset_id, version, dv.task, str(splits["train"]),
                                   *(str(splits[k]) if k in splits else None for k in ("val", "test")),
                                   home=home, derived_from=derived_from)
        except DatasetExistsError:
            child = resolve(f"{dataset_id}@{version}", home, validate_rows=False)
            with open(child.manifest_path, encoding="utf-8") as handle:
                recorded = json.load(handle).get("derived_from")
            if recorded != derived_from:
                raise DatasetExistsError(child.manifest_path, None, f"{child.ref} exists but was not derived from "
                                                                    f"{dv.ref} by this rule") from None
    return {"value": value, "ref": child.ref, "content_hash": child.content_hash, "removed_rows": removed,
            "kept_rows": len(kept), "rule": rule, "parent": dv.ref}


# ----------------------------------------------------------------------------------------------- analysis

def _per_example(run: Path, task: str):
    """Per test example: loss (classification: -log p(true label)) and accuracy/exact match, by row hash."""
    import numpy as np
    import pandas as pd

    frame = pd.read_parquet(run / "predictions.parquet")
    out = pd.DataFrame({"row_hash": frame["row_hash"]})
    for column in frame.columns:
        if column.startswith("tag."):
            out[column] = frame[column]
    if task == "classification":
        out["loss"] = -np.log(np.clip(frame["prob_true"].astype(float), 1e-12, 1.0))
        out["accuracy"] = frame["correct"].astype(float)
    else:
        out["loss"] = frame["loss"].astype(float)
        for name in ("token_f1", "exact_match"):
            if name in frame:
                out[name] = frame[name].astype(float)
    return out.drop_duplicates("row_hash").set_index("row_hash")


LOWER_IS_BETTER = {"loss"}


def _t975(df: int) -> float:
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
    return table.get(df, 1.96 if df > 30 else 2.1)


def _seed_interval(effects: Sequence[float]) -> Optional[List[float]]:
    n = len(effects)
    if n < 2:
        return None
    mean = sum(effects) / n
    sd = math.sqrt(sum((e - mean) ** 2 for e in effects) / (n - 1))
    half = _t975(n - 1) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def _bootstrap(diff, samples: int, seed: int) -> Optional[List[float]]:
    import numpy as np

    if samples <= 0 or len(diff) < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(samples, len(diff)))
    means = diff[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def analyze(task: str, by: str, arms: Dict[str, List[Path]], derived: Dict[str, dict], bootstrap_samples: int = 1000,
            seed: int = 0) -> dict:
    """Effects of removing each value (vs the full arm), per metric and test slice, with a verdict."""
    import numpy as np

    full = [_per_example(p, task) for p in arms[FULL]]
    shared = set(full[0].index)
    for frame in full[1:]:
        shared &= set(frame.index)
    tables = {value: [_per_example(p, task) for p in paths] for value, paths in arms.items() if value != FULL}
    for frames in tables.values():
        for frame in frames:
            shared &= set(frame.index)
    rows = sorted(shared)
    if not rows:
        raise VerifilyError(None, "attribution", "the arms share no test rows: the test split must be unchanged")
    base = full[0].loc[rows]
    tag = f"tag.{by}"
    metrics = [m for m in ("loss", "accuracy", "exact_match", "token_f1") if m in base.columns]
    primary = "loss"
    result = {"task": task, "by": by, "seeds": len(full), "test_rows": len(rows), "primary_metric": primary,
              "values": {}}
    for value, frames in tables.items():
        if len(frames) != len(full):
            raise VerifilyError(None, "attribution", f"arm {value} has {len(frames)} seeds, the full arm {len(full)}")
        slices = {"overall": np.ones(len(rows), dtype=bool)}
        if tag in base.columns:
            tags = base[tag].astype(str).to_numpy()
            slices[f"{by}!={value}"] = tags != str(value)
            for other in sorted(set(tags)):
                slices[f"{by}={other}"] = tags == other
        effects = {}
        for name, mask in slices.items():
            if not mask.any():
                continue
            entry = {"n": int(mask.sum())}
            for metric in metrics:
                per_seed = [float(f.loc[rows][metric].to_numpy()[mask].mean() - g.loc[rows][metric].to_numpy()[mask].mean())
                            for f, g in zip(frames, full)]
                diff = (np.mean([f.loc[rows][metric].to_numpy()[mask] for f in frames], axis=0)
                        - np.mean([g.loc[rows][metric].to_numpy()[mask] for g in full], axis=0))
                entry[metric] = {"effect": float(np.mean(per_seed)), "per_seed": per_seed,
                                 "seed_ci95": _seed_interval(per_seed),
                                 "bootstrap_ci95": _bootstrap(diff, bootstrap_samples, seed),
                                 "removed_mean": float(np.mean([f.loc[rows][metric].to_numpy()[mask].mean() for f in frames])),
                                 "full_mean": float(np.mean([g.loc[rows][metric].to_numpy()[mask].mean() for g in full]))}
            effects[name] = entry
        target = f"{by}!={value}" if f"{by}!={value}" in effects else "overall"
        verdict, why = _verdict(effects[target][primary], primary)
        result["values"][value] = {"removed_rows": derived[value]["removed_rows"],
                                   "kept_rows": derived[value]["kept_rows"], "derived_dataset": derived[value]["ref"],
                                   "verdict": verdict, "verdict_slice": target, "why": why, "slices": effects}
    return result


def _verdict(entry: dict, metric: str):
    """'hurts' when removing the value improves the metric on the other rows, consistently across seeds
    and with a paired interval that excludes zero; 'helps' for the opposite; otherwise no measurable effect."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    improvement = sign * entry["effect"]
    boot = entry["bootstrap_ci95"]
    seeds_agree = all(sign * e > 0 for e in entry["per_seed"]) or all(sign * e < 0 for e in entry["per_seed"])
    excludes_zero = boot is not None and (boot[0] > 0 or boot[1] < 0)
    detail = (f"removing it changes {metric} by {entry['effect']:+.4f} (paired 95% CI "
              f"{_fmt_ci(boot)}, seeds {', '.join(f'{e:+.4f}' for e in entry['per_seed'])})")
    if excludes_zero and seeds_agree:
        return ("hurts" if improvement > 0 else "helps"), detail
    return VERDICTS[2], detail


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a"


def render(result: dict, markdown: bool = False) -> str:
    """The verdict table (one row per removed value) and the per-slice effects on the primary metric."""
    metric = result["primary_metric"]
    lines = [f"Attribution by retraining: {result['by']} ({result['seeds']} seed(s) per arm, "
             f"{result['test_rows']} test rows, budget: {result.get('budget', {}).get('description', 'parent config')})", ""]
    header = ["removed", "rows removed", "verdict", f"Δ{metric} on other rows [paired 95% CI]", "seed 95% CI"]
    table = []
    for value, entry in result["values"].items():
        e = entry["slices"][entry["verdict_slice"]][metric]
        table.append([f"{result['by']}={value}", str(entry["removed_rows"]), entry["verdict"],
                      f"{e['effect']:+.4f} {_fmt_ci(e['bootstrap_ci95'])}", _fmt_ci(e["seed_ci95"])])
    lines += _table(header, table, markdown)
    lines.append("")
    lines.append(f"Δ{metric} by test slice (removed minus full; {'lower' if metric in LOWER_IS_BETTER else 'higher'} is better):")
    slice_names = sorted({s for entry in result["values"].values() for s in entry["slices"]
                          if not s.startswith(f"{result['by']}!=")})
    rows = []
    for value, entry in result["values"].items():
        rows.append([f"{result['by']}={value}"] + [
            f"{entry['slices'][s][metric]['effect']:+.4f}" if s in entry["slices"] else "-" for s in slice_names])
    lines += _table(["removed"] + slice_names, rows, markdown)
    lines.append("")
    lines.append("Each arm retrains from the parent's config; see docs/attribution.md for the method and its limits.")
    return "\n".join(lines)


def _table(header: List[str], rows: List[List[str]], markdown: bool) -> List[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
               ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]


def render_html(result: dict) -> str:
    """A self-contained HTML section: the verdict table and a chart of the effects with both intervals."""
    import base64
    import html
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["primary_metric"]
    values = list(result["values"])
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.6 * len(values)))
    for i, value in enumerate(values):
        entry = result["values"][value]
        e = entry["slices"][entry["verdict_slice"]][metric]
        color = {"hurts": "#c0392b", "helps": "#27ae60"}.get(entry["verdict"], "#7f8c8d")
        ax.plot([e["effect"]], [i], "o", color=color)
        if e["bootstrap_ci95"]:
            ax.plot(e["bootstrap_ci95"], [i, i], "-", color=color, lw=3)
        if e["seed_ci95"]:
            ax.plot(e["seed_ci95"], [i - 0.15, i - 0.15], ":", color=color, lw=1.5)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(values)), [f"without {result['by']}={v}" for v in values])
    ax.set_xlabel(f"Δ{metric} on the other test rows (removed − full); thick: paired bootstrap 95%, dotted: seeds")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    chart = base64.b64encode(buf.getvalue()).decode("ascii")
    text = html.escape(render(result))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Attribution by retraining</title>"
            "<style>body{font-family:sans-serif;margin:2em}pre{background:#f6f6f6;padding:1em}</style></head><body>"
            f"<section id='attribution'><h2>Causal attribution by retraining: {html.escape(result['by'])}</h2>"
            f"<img alt='effects' src='data:image/png;base64,{chart}'><pre>{text}</pre></section></body></html>")

