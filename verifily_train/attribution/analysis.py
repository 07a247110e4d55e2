"""Effects of removing each tag value, judged on a declared target against removing as many random rows.

For every removed value ``v`` three arms are trained at each seed: ``full`` (every row), ``v`` (its rows
removed) and a size-matched control (as many train rows removed at random, a fresh draw per seed). The
verdict answers one question on one target named before training (the gold set, else the evaluated split,
or a slice the user names): "on this target, are ``v``'s rows worse (or better) than as many random
rows?", judged by :func:`stats.one_draw_test`, which counts ``v``'s rows as one draw against the spread of
random subsets. Every other slice (the value's own test rows, the rest, each value) is a descriptive
effect beside it: the rows *without* ``v`` are a slice whose make-up the arms change unequally, so a clean
source that merely differs from the others would win a verdict read there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from verifily_train.artifacts.run import load_run_json
from verifily_train.attribution import target as targets
from verifily_train.attribution.stats import ALPHA, adjust, claim_verdicts, one_draw_test, rank_test, row_bootstrap
from verifily_train.config.metricspec import METRICS, attributed_metrics, lower_is_better
from verifily_train.errors import VerifilyError

FULL = "__full__"  # the arm that keeps every train row
VERDICTS = ("hurts", "helps", "no measurable effect at this budget", "not certified at this budget")
# the fourth: on the "helps" side the normal model rejects, the distribution-free rank p does not (claim_verdicts)
# loss (and perplexity) from the metric table; every other metric, a gold-set score too, is higher-better
LOWER_IS_BETTER = frozenset(spec.name for spec in METRICS if spec.lower_is_better)
PRIMARY = "loss"


def control_arm(rows: int, draw: int = 0) -> str:
    """The name of the size-matched control arm that removes ``rows`` random train rows (``draw``: which of the
    controls per seed)."""
    return f"__random_{int(rows)}__" if not draw else f"__random_{int(rows)}_{int(draw)}__"


def control_arms(rows: int, controls: int) -> List[str]:
    """The names of the ``controls`` size-matched control arms of one removed size."""
    return [control_arm(rows, k) for k in range(controls)]


def per_example(run: Path, task: str):
    """Per test example of a Run: loss (classification: -log p(true label)) and accuracy/exact match, by row hash."""
    import pandas as pd

    return per_example_frame(pd.read_parquet(run / "predictions.parquet"), task)


def target_score(run: Path, target: str) -> float:
    """A Run's score on a target read from its metrics (``gold``: token F1 on the gold set)."""
    metrics = load_run_json(run).get("metrics") or {}
    name = targets.GOLD_METRIC if target == "gold" else target
    if name not in metrics:
        raise VerifilyError(run, "metrics", f"has no {name} to judge the target {target} on")
    return float(metrics[name])


def per_example_frame(frame, task: str):
    """:func:`per_example` from a predictions table already in memory."""
    import numpy as np
    import pandas as pd

    out = pd.DataFrame({"row_hash": frame["row_hash"]})
    for column in frame.columns:
        if column.startswith("tag."):
            out[column] = frame[column]
    if task == "classification":  # no per-row loss column: the primary metric is -log p(true label)
        out[PRIMARY] = -np.log(np.clip(frame["prob_true"].astype(float), 1e-12, 1.0))
    for spec in attributed_metrics():
        if task in spec.tasks and spec.column in frame:
            out[spec.name] = frame[spec.column].astype(float)
    return out.drop_duplicates("row_hash").set_index("row_hash")


def _shared_rows(tables: Dict[str, list]) -> List[str]:
    shared = None
    for frames in tables.values():
        for frame in frames:
            shared = set(frame.index) if shared is None else shared & set(frame.index)
    return sorted(shared or [])


def analyze(task: str, by: str, tables: Dict[str, list], plan: Dict[str, dict], target: str = "test",
            alpha: float = ALPHA, correction: str = "holm", bootstrap_samples: int = 1000, seed: int = 0,
            split: str = "test", target_scores: Optional[Dict[str, List[float]]] = None,
            at_steps: Optional[int] = None) -> dict:
    """Verdicts for every value in ``plan`` from per-example tables ``{arm: [frame per seed]}``.

    ``plan[value]`` holds ``removed_rows``, ``kept_rows``, ``derived_dataset`` and ``control`` (the name of
    its size-matched control arm in ``tables``) or ``controls`` (the names of several, each a fresh random
    subset per seed). The verdict of each value is the one-draw test of (value arm minus the controls' mean) on the primary metric over ``target``'s rows (``test``/``val``: every row;
    ``slice:<tag>=<value>`` or ``!=``: those rows; ``gold``: the per-seed ``target_scores``), corrected over
    the values (``correction``: holm or bh, at ``alpha``). The other slices are descriptive effects.
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
    metrics = [spec.name for spec in attributed_metrics() if spec.name in base.columns]
    family = len(plan)
    target_key = targets.slice_name(target)
    if target == "gold":
        if not target_scores:
            raise VerifilyError(None, "--target", "gold: the arms' gold-set scores are missing")
        primary, target_rows = targets.GOLD_METRIC, None
    else:
        primary = PRIMARY
        target_rows = int(targets.target_mask(base, target).sum())
        if target_rows == 0:
            raise VerifilyError(None, "--target", f"{target} selects none of the {len(rows)} evaluated rows")
    words = targets.describe(target, split, target_rows)
    result = {"task": task, "by": by, "seeds": seeds, "test_rows": len(rows), "primary_metric": primary,
              "target": {"name": target, "split": split, "rows": target_rows, "words": words, "slice": target_key},
              "alpha": alpha, "correction": correction, "at_steps": at_steps, "values": {},
              "method": _method_line(seeds, family, alpha, correction, words,
                                     max((len(i.get("controls") or [i["control"]]) for i in plan.values()), default=1)),
              "conditional": (f"verdicts are conditional on these {target_rows or 'gold'} target rows: they generalise "
                              f"over training seeds and over which rows a random subset holds, not over a new draw "
                              f"of target rows (the row bootstrap beside each effect shows that precision)")}
    for value, info in plan.items():
        control = info["control"]
        controls = list(info.get("controls") or [control])
        slices = {}
        if target != "gold":
            slices[target_key] = targets.target_mask(base, target)
        slices.setdefault("overall", np.ones(len(rows), dtype=bool))
        if tag in base.columns:
            tags = base[tag].astype(str).to_numpy()
            for other in sorted(set(tags)):
                slices.setdefault(f"{by}={other}", tags == other)
            slices.setdefault(f"{by}!={value}", tags != str(value))
        effects = {}
        if target == "gold":
            effects["gold"] = {"n": None, primary: _cell(target_scores[FULL], target_scores[value],
                                                         [target_scores[c] for c in controls], None, alpha, family,
                                                         bootstrap_samples, seed, _sign(primary))}
        for name, mask in slices.items():
            if not mask.any():
                continue
            entry = {"n": int(mask.sum())}
            for metric in metrics:
                full, removed, *randoms = [[float(f[metric].to_numpy()[mask].mean()) for f in data[arm]]
                                           for arm in (FULL, value, *controls)]
                per_row = (np.mean([f[metric].to_numpy()[mask] for f in data[value]], axis=0)
                           - np.mean([f[metric].to_numpy()[mask] for c in controls for f in data[c]], axis=0))
                entry[metric] = _cell(full, removed, randoms, per_row, alpha, family, bootstrap_samples, seed,
                                      _sign(metric))
            effects[name] = entry
        result["values"][value] = {"removed_rows": info["removed_rows"], "kept_rows": info["kept_rows"],
                                   "derived_dataset": info["derived_dataset"], "control": control,
                                   "controls": controls,
                                   "verdict_slice": target_key, "slices": effects}
    _apply_verdicts(result, alpha, correction)
    return result


def _sign(metric: str) -> float:
    return -1.0 if lower_is_better(metric) else 1.0


def _cell(full: List[float], removed: List[float], randoms: List[List[float]], per_row, alpha: float, family: int,
          bootstrap_samples: int, seed: int, sign: float) -> dict:
    """One slice x metric: (value - the controls' mean) per seed with its one-draw interval, the removal effects
    beside it. ``randoms`` holds one per-seed list per control arm."""
    import numpy as np

    random_ = [float(np.mean(c)) for c in zip(*randoms)]  # the controls' mean per seed
    diffs = [r - c for r, c in zip(removed, random_)]
    within = [r - f for r, f in zip(removed, full)]
    every_random = [c - f for i, f in enumerate(full) for c in (arm[i] for arm in randoms)]  # seed-major
    random_effects = [c - f for c, f in zip(random_, full)]
    test = one_draw_test(diffs, within, every_random, alpha, family)
    spread = float(np.std(every_random, ddof=1)) if len(every_random) > 1 else None
    rank = rank_test(float(np.mean(within)), every_random, sign)
    return {"effect": test["mean"], "per_seed": diffs, **_test_fields(test), "random_spread": spread,
            "rank_p": rank["rank_p"], "controls_as_extreme": rank["as_extreme"], "control_runs": rank["runs"],
            "in_spreads": (test["mean"] / spread) if spread else None,
            "removal_effect": float(np.mean(within)), "removal_per_seed": within,
            "random_removal_effect": float(np.mean(random_effects)), "random_per_seed": random_effects,
            "random_per_run": every_random, "controls": len(randoms),
            "bootstrap_ci95": None if per_row is None else row_bootstrap(per_row, bootstrap_samples, seed),
            "removed_mean": float(np.mean(removed)), "control_mean": float(np.mean(random_)),
            "full_mean": float(np.mean(full))}


def _test_fields(test: dict) -> dict:
    return {"ci95": test["ci95"], "p": test["p"], "mde": test["mde"], "se": test["se"], "seed_sd": test["sd"],
            "subset_sd": test["subset_sd"], "noise_sd": test["noise_sd"], "test": test["test"]}


def _apply_verdicts(result: dict, alpha: float, correction: str) -> None:
    metric = result["primary_metric"]
    values = list(result["values"])
    cells = [result["values"][v]["slices"][result["values"][v]["verdict_slice"]][metric] for v in values]
    sign = _sign(metric)
    harmful = [sign * c["effect"] > 0 for c in cells]  # removing the value did better than removing random rows
    claims = claim_verdicts([{"p": c["p"], "harmful": h, "removal_effect": c["removal_effect"],
                              "random": c["random_per_run"], "sign": sign} for c, h in zip(cells, harmful)],
                            alpha, correction)
    test_only = adjust([c["p"] for c in cells], correction)  # the normal model's p alone, for the fourth verdict
    result["family"] = {"claims": claims[0]["family"] if claims else 0,
                        "helps_testable": any(c["helps_testable"] for c in claims)}
    for value, cell, h, claim, p_test in zip(values, cells, harmful, claims, test_only):
        entry = result["values"][value]
        entry["p_adjusted"] = claim["p_adjusted"]
        entry["helps_testable"] = claim["helps_testable"]
        if claim["verdict"] is not None and cell["effect"] != 0:
            entry["verdict"] = claim["verdict"]
        elif not h and p_test is not None and p_test <= alpha and cell["effect"] != 0:
            entry["verdict"] = VERDICTS[3]
        else:
            entry["verdict"] = VERDICTS[2]
        entry["why"] = headline(result, value, cell, claim["p_adjusted"], p_test)


def headline(result: dict, value: str, cell: dict, p_adj: Optional[float], p_test: Optional[float] = None) -> str:
    """The verdict in words: what was removed, on which target, by how much against random rows, how sure."""
    entry = result["values"][value]
    n, metric, target = entry["removed_rows"], result["primary_metric"], result["target"]
    where = target["words"]
    steps = f" at {result['at_steps']} steps" if result.get("at_steps") else ""
    spreads = f"{abs(cell['in_spreads']):.1f}x the spread of random subsets; " if cell.get("in_spreads") else ""
    label = {"holm": "Holm", "bh": "BH"}[result["correction"]]
    if p_adj is None:
        return (f"{entry['verdict']} on {where}: removing its {n} rows changed {metric} by {cell['effect']:+.4f} "
                f"against removing {n} random rows{steps}; {result['seeds']} seed(s) cannot tell one draw of rows "
                f"from the spread of random ones: use --seeds >= 3")
    lower = cell["effect"] < 0
    if entry["verdict"] in ("hurts", "helps"):
        return (f"{entry['verdict']} {where}: removing its {n} rows {'lowered' if lower else 'raised'} {metric} by "
                f"{abs(cell['effect']):.4f} more than removing {n} random rows{steps} ({spreads}{label} p "
                f"{p_adj:.3g}){_rank_words(cell, result['alpha'])}")
    if entry["verdict"] == VERDICTS[3]:
        need = _runs_for_helps(len(result["values"]), result["alpha"])
        return (f"not certified on {where}: removing its {n} rows {'lowered' if lower else 'raised'} {metric} by "
                f"{abs(cell['effect']):.4f} more than removing {n} random rows{steps} ({spreads}{label} p {p_test:.3g} "
                f"under a normal model), {_as_far(cell)}; a \"helps\" needs a distribution-free p (random subsets' "
                f"effects are heavy-tailed on this side): {cell['rank_p']:.3g} with {cell['control_runs']} runs, "
                f"and {need} control runs per size can reach {label}'s level (--controls "
                f"{-(-need // result['seeds'])})")
    helps_side = (cell["effect"] < 0) != lower_is_better(metric)
    how = (f"rank p {p_adj:.3g}; a \"helps\" is not testable at {cell['control_runs']} runs"
           if helps_side and not entry.get("helps_testable") else f"{label} p {p_adj:.3g}")
    return (f"no measurable effect on {where}: removing its {n} rows changed {metric} by {cell['effect']:+.4f} "
            f"against removing {n} random rows{steps} ({spreads}{how}); smallest effect "
            f"detectable at 80% power: {cell['mde']:.4f}")


def _as_far(cell: dict) -> str:
    k, runs = cell["controls_as_extreme"], cell["control_runs"]
    return f"beyond all its {runs} random-subset runs" if k == 0 else f"as far out as {k} of its {runs} random-subset runs"


def _runs_for_helps(values: int, alpha: float) -> int:
    """Control runs per size at which the rank p's floor 2 / (runs + 1) reaches the strictest Holm level."""
    import math

    return max(1, math.ceil(2 * max(values, 1) / alpha) - 1)


def _rank_words(cell: dict, alpha: float) -> str:
    """Where a verdict's p is smaller than any distribution-free test on these control runs can give, say so."""
    if cell.get("rank_p") is None or cell["rank_p"] <= alpha:
        return ""
    return (f"; that p is the normal model's, on the light side of random subsets' effects; distribution-free: "
            f"{_as_far(cell)}, rank p {cell['rank_p']:.3g}")


def _method_line(seeds: int, family: int, alpha: float, correction: str, words: str, controls: int = 1) -> str:
    name = {"holm": "Holm (family-wise error)", "bh": "Benjamini-Hochberg (false discovery rate)"}[correction]
    draws = "a fresh draw per seed" if controls == 1 else f"the mean of {controls} fresh draws per seed"
    return (f"verdict on {words}: (value removed) minus (as many random rows removed, {draws}) over "
            f"{seeds} seeds, the value's rows counted as one draw against the spread of random subsets (generalized "
            f"one-draw test): a \"hurts\" one-sided from that test, a \"helps\" one-sided from the distribution-free "
            f"rank p among the random-subset runs, "
            f"{name} over the claims of {family} value(s) that can reach {alpha:g} (Tarone: a \"helps\" needs "
            f"enough runs)")


def fmt_ci(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a"
