"""Seed-level tests of "did the change move the metric?" from replicate runs of each side.

Two runs that differ only in their seed are two different models; so a claim about a *data or config
change* needs the spread of several runs per side, not the rows of one. The unit here is the run: each
run's metric on the shared test rows (overall and per tag slice) is one observation, and each slice x
metric cell is tested at the seed level:

- ``paired``: both groups trained the same seeds, so each seed gives one difference B_s - A_s (a shared
  seed shares initial weights and, for unchanged rows, their order) and a one-sample t over seeds tests it;
- ``welch``: otherwise, Welch's two-sample t (unequal variances, Welch-Satterthwaite degrees of freedom).

Both are exact under normal run-to-run noise; the calibration (bench/aa.py, docs/evaluation.md) measures
them on real runs. A cell whose runs agree to the last digit (no spread on either side) cannot be tested
by a t: it falls back to the exact permutation test of the group labels (every relabelling of the runs),
which never calls a difference that a relabelling reproduces. One Benjamini-Hochberg correction runs over
every cell; with every null true (an A/A pair) BH's false-discovery rate is P(any star), the figure
calibrated. ``mde`` is the smallest true difference the cell's test finds 80% of the time at the
per-cell level BH needs for a lone discovery (q / cells), from the cell's own seed spread.
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

POWER = 0.80  # the power at which ``mde`` is stated
MIN_REPLICATES = 2  # runs per side a seed-level test needs (3 or more for a usable one: docs/evaluation.md)


def paired_by_seed(seeds_a: Sequence[int], seeds_b: Sequence[int]) -> bool:
    """The groups pair by seed when both trained exactly the same seeds (each seed once)."""
    return len(seeds_a) >= MIN_REPLICATES and sorted(seeds_a) == sorted(seeds_b) and len(set(seeds_a)) == len(seeds_a)


def _t_quantile(p: float, df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


def _relabel_p(a: np.ndarray, b: np.ndarray, paired: bool) -> float:
    """Exact two-sided permutation p-value of mean(B) - mean(A) over every relabelling of the runs
    (paired: every sign pattern of the per-seed differences)."""
    observed = abs(float(b.mean() - a.mean()))
    tie = 1e-12 * max(1.0, observed)
    if paired:
        d = b - a
        stats_ = [abs(float(np.mean(d * np.array(signs)))) for signs in itertools.product((1.0, -1.0), repeat=len(d))]
    else:
        pooled, n_b = np.concatenate([a, b]), len(b)
        stats_ = []
        for chosen in itertools.combinations(range(len(pooled)), n_b):
            mask = np.zeros(len(pooled), dtype=bool)
            mask[list(chosen)] = True
            stats_.append(abs(float(pooled[mask].mean() - pooled[~mask].mean())))
    return float(np.mean([s >= observed - tie for s in stats_]))


def seed_test(a: Sequence[float], b: Sequence[float], paired: bool, alpha_mde: float) -> dict:
    """B - A of one cell from per-run values: mean difference, 95% t interval over seeds, two-sided p,
    and the minimum detectable effect at two-sided level ``alpha_mde`` and ``POWER``."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a).all() and np.isfinite(b).all() and min(len(a), len(b)) >= MIN_REPLICATES
    out = {"a": float(a.mean()) if len(a) else None, "b": float(b.mean()) if len(b) else None,
           "a_per_run": [float(x) for x in a], "b_per_run": [float(x) for x in b],
           "delta": float(b.mean() - a.mean()) if len(a) and len(b) else None, "test": "paired t" if paired else "welch t",
           "ci95": None, "p": None, "se": None, "df": None, "mde": None}
    if not ok:
        return out
    if paired:
        d = b - a
        se, df = float(d.std(ddof=1) / math.sqrt(len(d))), float(len(d) - 1)
    else:
        va, vb = float(a.var(ddof=1)) / len(a), float(b.var(ddof=1)) / len(b)
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else float(len(a) + len(b) - 2)
    delta = out["delta"]
    out.update(se=se, df=df)
    if se <= 1e-15 * max(1.0, abs(delta)):  # no spread on either side: no t; the exact relabelling test
        out.update(p=_relabel_p(a, b, paired), ci95=[delta, delta], test=out["test"] + " (no seed spread: exact "
                                                                                     "relabelling test)", mde=None)
        return out
    t = delta / se
    half = _t_quantile(0.975, df) * se
    out.update(p=float(2 * stats.t.sf(abs(t), df)), ci95=[delta - half, delta + half],
               mde=(_t_quantile(1 - alpha_mde / 2, df) + _t_quantile(POWER, df)) * se)
    return out


def group_cells(values_a: Dict[str, List[float]], values_b: Dict[str, List[float]], paired: bool,
                q: float, cells: int) -> Dict[str, dict]:
    """``seed_test`` per metric of one slice cell (the metrics both sides measured)."""
    alpha = q / max(cells, 1)
    return {m: seed_test(values_a[m], values_b[m], paired, alpha) for m in sorted(set(values_a) & set(values_b))}


def describe_power(n_a: int, n_b: int, paired: bool) -> Optional[str]:
    """One line when the replicate count leaves the test weak (None when it is the usual design)."""
    n = min(n_a, n_b)
    if n < MIN_REPLICATES:
        return f"{n} run(s) on one side: a seed-level test needs at least {MIN_REPLICATES} per side"
    if n < 3:
        return f"{n} runs per side: {'1 degree' if paired else 'about 2 degrees'} of freedom, only large effects are found"
    return None
