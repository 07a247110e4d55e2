"""``attribute --rows --verify K``: is removing the K rows flagged most harmful better than removing K random rows?

Three arms at every seed, as in the tag-level attribution (``attribution/analysis.py``): the full data, the
data without the top-K rows, and a size-matched control without as many random rows (a fresh draw per
seed). The verdict is the same one-draw test on the target's loss (the K rows are one draw, judged against
the spread of random K-row subsets), top-K arm minus control arm, with the same correction (one test here,
so Holm and BH leave its p unchanged).
"""

from __future__ import annotations

from typing import Dict, List, Optional

from verifily_train.attribution.analysis import FULL, analyze, control_arm
from verifily_train.attribution.rows.plan import parse_slice_target
from verifily_train.attribution.stats import ALPHA

ARM = "top_rows"  # the arm trained without the top-K rows


def target_frame(frame, target: str):
    """The per-example rows of the verification's target: a ``slice:<tag>=<value>`` keeps that slice's rows,
    a ``slice:<tag>!=<value>`` the rest."""
    if not target.startswith("slice:"):
        return frame
    key, negate, value = parse_slice_target(target)
    column = f"tag.{key}"
    if column not in frame.columns:
        return frame if negate else frame.iloc[0:0]
    tagged = frame[column].astype(str) == value
    return frame[~tagged] if negate else frame[tagged]


def analyze_verification(task: str, tables: Dict[str, list], removed_rows: int, kept_rows: int, derived_ref: str,
                         target: str = "test", alpha: float = ALPHA, correction: str = "holm",
                         bootstrap_samples: int = 1000) -> dict:
    """The verdict from per-example tables ``{FULL: [...], ARM: [...], control_arm(removed_rows): [...]}`` (one
    frame per seed, as ``attribution.per_example`` reads a Run's predictions)."""
    control = control_arm(removed_rows)
    tables = {arm: [target_frame(f, target) for f in frames] for arm, frames in tables.items()}
    plan = {ARM: {"removed_rows": removed_rows, "kept_rows": kept_rows, "derived_dataset": derived_ref,
                  "control": control}}
    result = analyze(task, "__rows__", tables, plan, target="test", alpha=alpha, correction=correction,
                     bootstrap_samples=bootstrap_samples)  # the tables already hold the target's rows alone
    entry = result["values"][ARM]
    cell = entry["slices"][entry["verdict_slice"]][result["primary_metric"]]
    verdict = entry["verdict"]
    k = removed_rows
    if verdict == "hurts":
        summary = (f"confirmed: removing the {k} flagged rows lowers the target loss by {-cell['effect']:.4f} more "
                   f"than removing {k} random rows ({correction} p={entry['p_adjusted']:.3g} <= {alpha:g})")
    elif verdict == "helps":
        summary = (f"contradicted: removing the {k} flagged rows raises the target loss by {cell['effect']:.4f} "
                   f"against removing {k} random rows ({correction} p={entry['p_adjusted']:.3g})")
    else:
        detectable = f"; smallest effect detectable at 80% power: {cell['mde']:.4f}" if cell.get("mde") else ""
        summary = (f"not shown: removing the {k} flagged rows changes the target loss by {cell['effect']:+.4f} "
                   f"against removing {k} random rows, not significant at {alpha:g}{detectable}")
    return {"k": k, "kept_rows": kept_rows, "derived_dataset": derived_ref, "control": control, "target": target,
            "seeds": result["seeds"], "test_rows": result["test_rows"], "metric": result["primary_metric"],
            "effect": cell["effect"], "per_seed": cell["per_seed"], "ci95": cell["ci95"], "p": cell["p"],
            "p_adjusted": entry["p_adjusted"], "mde": cell["mde"], "correction": correction, "alpha": alpha,
            "removal_effect": cell["removal_effect"], "random_removal_effect": cell["random_removal_effect"],
            "removal_per_seed": cell["removal_per_seed"], "random_per_seed": cell["random_per_seed"],
            "subset_sd": cell["subset_sd"], "in_spreads": cell["in_spreads"],
            "verdict": verdict, "confirmed": verdict == "hurts", "summary": summary, "why": entry["why"],
            "method": result["method"].replace("(value removed)", f"(top {k} rows removed)")}


def top_row_hashes(table, method: str, k: int) -> List[str]:
    """The row hashes of the ``k`` rows ranked most harmful by ``method`` (rank 1 first)."""
    ranked = table.sort_values(f"rank_{method}", kind="stable")
    return [str(h) for h in ranked["row_hash"].head(k)]


def check_verify(k: int, train_rows: int, seeds: int) -> Optional[str]:
    """The one-line problem with ``--verify K`` for a run with ``train_rows`` rows, or None."""
    if k < 1:
        return f"must be >= 1 rows; got {k}"
    if k >= train_rows:
        return f"cannot remove {k} of the run's {train_rows} train rows"
    if seeds < 3:
        return f"needs --seeds >= 3 for the one-draw test (two variance parts); got {seeds}"
    return None

