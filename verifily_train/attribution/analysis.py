"""Effects of removing each tag value, judged against removing as many random rows, over seeds.

For every removed value ``v`` three arms are trained at each seed: ``full`` (every row), ``v`` (its rows
removed) and a size-matched control (as many train rows removed at random, a fresh draw per seed). On
the unchanged test rows, per metric and slice, the output reports the removal effect (``v`` minus full),
the random-removal effect (control minus full) and their difference (``v`` minus control), which is what
the verdict tests: "is this data worse (or better) than average data?", not "does less data matter?".
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from verifily_train.attribution.stats import ALPHA, SLICE_Q, adjust, row_bootstrap, seed_test
from verifily_train.errors import VerifilyError

FULL = "__full__"  # the arm that keeps every train row
VERDICTS = ("hurts", "helps", "no measurable effect at this budget")
LOWER_IS_BETTER = {"loss"}
PRIMARY = "loss"


def control_arm(rows: int) -> str:
    """The name of the size-matched control arm that removes ``rows`` random train rows."""
    return f"__random_{int(rows)}__"


def per_example(run: Path, task: str):
    """Per test example of a Run: loss (classification: -log p(true label)) and accuracy/exact match, by row hash."""
    import pandas as pd

    return per_example_frame(pd.read_parquet(run / "predictions.parquet"), task)


def per_example_frame(frame, task: str):
    """:func:`per_example` from a predictions table already in memory."""
    import numpy as np
    import pandas as pd

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


def _shared_rows(tables: Dict[str, list]) -> List[str]:
    shared = None
    for frames in tables.values():
        for frame in frames:
            shared = set(frame.index) if shared is None else shared & set(frame.index)
    return sorted(shared or [])


def analyze(task: str, by: str, tables: Dict[str, list], plan: Dict[str, dict], alpha: float = ALPHA,
            correction: str = "holm", slice_q: float = SLICE_Q, bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """Verdicts for every value in ``plan`` from per-example tables ``{arm: [frame per seed]}``.

    ``plan[value]`` holds ``removed_rows``, ``kept_rows``, ``derived_dataset`` and ``control`` (the name of
    its size-matched control arm in ``tables``). Verdicts: a seed-level paired t test of value arm minus
    control arm on the primary metric over the test rows without the value, corrected over the values
    (``correction``: holm or bh, at ``alpha``). Every other slice x metric cell gets the same test, with
    Benjamini-Hochberg at ``slice_q`` over all of them (descriptive stars).
    """
    import numpy as np

    seeds = len(tables[FULL])
    for arm, frames in tables.items():
        if len(frames) != seeds:
            raise VerifilyError(None, "attribution", f"arm {arm} has {len(frames)} seeds, the full arm {seeds}")
    rows = _shared_rows(tables)
    if not rows:
        raise VerifilyError(None, "attribution", "the arms share no test rows: the test split must be unchanged")
    data = {arm: [f.loc[rows] for f in frames] for arm, frames in tables.items()}
    base = data[FULL][0]
    tag = f"tag.{by}"
    metrics = [m for m in ("loss", "accuracy", "exact_match", "token_f1") if m in base.columns]
    family = len(plan)
    result = {"task": task, "by": by, "seeds": seeds, "test_rows": len(rows), "primary_metric": PRIMARY,
              "alpha": alpha, "correction": correction, "slice_q": slice_q, "values": {},
              "method": _method_line(seeds, family, alpha, correction)}
    cells = []  # (value, slice, metric) for the slice-level BH
    for value, info in plan.items():
        control = info["control"]
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
                def means(arm):
                    return [float(f[metric].to_numpy()[mask].mean()) for f in data[arm]]

                full, removed, random_ = means(FULL), means(value), means(control)
                diffs = [r - c for r, c in zip(removed, random_)]
                test = seed_test(diffs, alpha, family)
                per_row = (np.mean([f[metric].to_numpy()[mask] for f in data[value]], axis=0)
                           - np.mean([f[metric].to_numpy()[mask] for f in data[control]], axis=0))
                entry[metric] = {
                    "effect": test["mean"], "per_seed": diffs, "seed_ci95": test["ci95"], "p": test["p"],
                    "mde": test["mde"], "seed_sd": test["sd"],
                    "removal_effect": float(np.mean([r - f for r, f in zip(removed, full)])),
                    "removal_per_seed": [r - f for r, f in zip(removed, full)],
                    "random_removal_effect": float(np.mean([c - f for c, f in zip(random_, full)])),
                    "random_per_seed": [c - f for c, f in zip(random_, full)],
                    "bootstrap_ci95": row_bootstrap(per_row, bootstrap_samples, seed),
                    "removed_mean": float(np.mean(removed)), "control_mean": float(np.mean(random_)),
                    "full_mean": float(np.mean(full))}
                cells.append((value, name, metric))
            effects[name] = entry
        target = f"{by}!={value}" if f"{by}!={value}" in effects else "overall"
        result["values"][value] = {"removed_rows": info["removed_rows"], "kept_rows": info["kept_rows"],
                                   "derived_dataset": info["derived_dataset"], "control": control,
                                   "verdict_slice": target, "slices": effects}
    _apply_verdicts(result, alpha, correction)
    adjusted = adjust([result["values"][v]["slices"][s][m]["p"] for v, s, m in cells], "bh")
    for (v, s, m), q in zip(cells, adjusted):
        cell = result["values"][v]["slices"][s][m]
        cell["q_bh"] = q
        cell["significant_bh"] = q is not None and q <= slice_q
    return result


def _apply_verdicts(result: dict, alpha: float, correction: str) -> None:
    metric = result["primary_metric"]
    values = list(result["values"])
    cells = [result["values"][v]["slices"][result["values"][v]["verdict_slice"]][metric] for v in values]
    adjusted = adjust([c["p"] for c in cells], correction)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    for value, cell, p_adj in zip(values, cells, adjusted):
        entry = result["values"][value]
        entry["p_adjusted"] = p_adj
        if p_adj is not None and p_adj <= alpha and cell["effect"] != 0:
            entry["verdict"] = "hurts" if sign * cell["effect"] > 0 else "helps"
        else:
            entry["verdict"] = VERDICTS[2]
        entry["why"] = _why(cell, p_adj, metric, result["seeds"], correction)


def _why(cell: dict, p_adj: Optional[float], metric: str, seeds: int, correction: str) -> str:
    seeds_text = ", ".join(f"{e:+.4f}" for e in cell["per_seed"])
    if p_adj is None:
        return (f"removing it changes {metric} by {cell['effect']:+.4f} against as many random rows removed "
                f"(seeds {seeds_text}); {seeds} seed(s) give no estimate of training variance: use --seeds >= 3")
    return (f"removing it changes {metric} by {cell['effect']:+.4f} against as many random rows removed "
            f"(seed 95% CI {fmt_ci(cell['seed_ci95'])}, t test p={cell['p']:.3g}, {correction} p={p_adj:.3g}; "
            f"seeds {seeds_text}); smallest effect detectable at 80% power: {cell['mde']:.4f}")


def _method_line(seeds: int, family: int, alpha: float, correction: str) -> str:
    name = {"holm": "Holm (family-wise error)", "bh": "Benjamini-Hochberg (false discovery rate)"}[correction]
    return (f"verdict: paired t test over {seeds} seeds of (value removed) minus (as many random rows removed), "
            f"{name} over {family} value(s) at {alpha:g}; the test-row bootstrap is test-set precision only")


def fmt_ci(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a"
