"""``attribute --rows --verify K``: is removing the K rows flagged most harmful better than removing K random rows?

Three arms at every seed, as in the tag-level attribution (``attribution/analysis.py``): the full data, the
data without the top-K rows, and a size-matched control without as many random rows (a fresh draw per
seed). The top K are ranked against one set of rows (``--select``, default val) and confirmed on another
(``--target``, default test; ``check_selection``). The verdict is the same one-draw test on the target's loss (the K rows are one draw, judged against
the spread of random K-row subsets), top-K arm minus control arm, with the same correction (one test here,
so Holm and BH leave its p unchanged).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

from verifily_train.attribution.analysis import analyze, control_arm
from verifily_train.attribution.rows.plan import (DEFAULT_ATTRIBUTION, DEFAULT_METHOD, TARGET_METHODS,
                                                  RowAttributionPlan, parse_slice_target, target_rows)
from verifily_train.attribution.stats import ALPHA
from verifily_train.errors import ConfigError

ARM = "top_rows"  # the arm trained without the top-K rows
DEFAULT_SELECT = "val"  # --verify ranks target-aware scores against the val loss, and confirms on --target


def selection_target(select: Optional[str], target: str, same_rows: bool) -> str:
    """What ``--verify``'s ranking scores against: ``--select``, else val (``--same-rows``: ``--target`` itself)."""
    return select or (target if same_rows else DEFAULT_SELECT)


def verify_method(methods: List[str], asked: Optional[str]) -> str:
    """The score ``--verify`` ranks by: ``--verify-by``, else the attribution default when computed (the family
    whose claim is about the target's loss, the claim retraining checks), else the suspect-row default."""
    if asked:
        if asked not in methods:
            raise ConfigError(None, "--verify-by", f"{asked!r} is not computed in this call (methods: "
                                                   f"{', '.join(methods)}); add it to --methods")
        return asked
    for method in (DEFAULT_ATTRIBUTION, "tracin_adam", DEFAULT_METHOD):
        if method in methods:
            return method
    return methods[0]


def evaluated_split(tokenized_dir) -> str:
    """The split retrained runs are evaluated on (and so the one ``--verify`` confirms on): test, else val."""
    return "test" if (Path(tokenized_dir) / "test.parquet").is_file() else "val"


def check_selection(plan: RowAttributionPlan, verify_target: str, method: str, same_rows: bool) -> dict:
    """How ``--verify``'s ranking (``plan.target``, by ``method``) relates to the rows it is confirmed on.

    A score that reads the target rows and is confirmed on the same rows double-dips: the top K were picked
    for lowering exactly that loss. Shared rows are a ``ConfigError`` unless ``same_rows``; a suspect-row score
    reads no target, so its ranking cannot have seen the confirming rows."""
    split = evaluated_split(plan.tokenized_dir)
    verified = set(target_rows(replace(plan, target=verify_target, target_split=split)))
    selected = set(target_rows(plan)) if plan.target_split == split else set()
    reads = method in TARGET_METHODS
    shared = len(selected & verified) if reads else 0
    where = f"{plan.target} ({plan.target_split} rows)"
    if shared and not same_rows:
        raise ConfigError(None, "--select", f"--verify would rank by {method} against {where} and confirm on "
                                            f"{verify_target} ({split} rows): {shared} rows are both; select with "
                                            "val (the default) or a slice disjoint from --target, or pass "
                                            "--same-rows to accept a check that saw its own rows")
    if not reads:
        note = (f"ranked by {method}, which reads no target rows: the ranking cannot have seen the {len(verified)} "
                f"{split} rows it is confirmed on")
    elif shared:
        note = (f"--same-rows: ranked by {method} against {where} and confirmed on {shared} of the same rows; the "
                "check is optimistic (the top rows were picked for lowering that very loss)")
    else:
        note = (f"ranked by {method} against {where}, confirmed on {verify_target} ({len(verified)} {split} rows): "
                "no row used to select is used to confirm")
    return {"method": method, "selected_on": plan.target, "selection_split": plan.target_split,
            "selection_rows": len(selected) if plan.target_split == split else len(target_rows(plan)),
            "verified_on": verify_target, "verified_split": split, "verified_rows": len(verified),
            "reads_target": reads, "shared_rows": shared, "same_rows": bool(same_rows), "note": note}


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
    elif verdict == "not certified at this budget":
        summary = (f"contradicted in direction, not certified: removing the {k} flagged rows raises the target loss "
                   f"by {cell['effect']:.4f} against removing {k} random rows; {entry['why'].split('; ', 1)[-1]}")
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

