"""Seed-level tests of "did the change move the metric?" from replicate runs of each side.

Two runs that differ only in their seed
are two different models; so a claim about a *data or config change* needs the spread of several runs
per side, not the rows of one. The unit here is the run: each run's metric on the shared test rows
(overall and per tag slice) is one observation, and each slice x metric cell gets Welch's two-sample t
(unequal variances, Welch-Satterthwaite degrees of freedom), exact under normal run-to-run noise.

Why not pair by seed when both sides trained the same seeds: a paired t over n seeds has n - 1 degrees of
freedom against Welch's up to 2n - 2, which at the replicate counts users run (3-5) costs more than the
pairing removes; and its null cannot be calibrated by an A/A pair (one config at one seed trains the same
bytes twice). Welch stays valid when a shared seed makes the two sides alike: it is then conservative.
A cell whose runs agree to the last digit on both sides has no t: it gets the exact permutation test of
the group labels (every relabelling of the runs) instead. Where seeds land in separate modes (tiny
classifiers that collapse to the majority class on some seeds), a few runs a side can all fall in one
mode on one side and the other on the other: no test on so few runs can tell that from an effect, and
the calibration counts it as the false call it is. One Benjamini-Hochberg correction runs over
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


def _t_quantile(p: float, df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


def _relabel_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided permutation p-value of mean(B) - mean(A) over every relabelling of the runs."""
    observed = abs(float(b.mean() - a.mean()))
    tie = 1e-12 * max(1.0, observed)
    pooled, n_b = np.concatenate([a, b]), len(b)
    reached = []
    for chosen in itertools.combinations(range(len(pooled)), n_b):
        mask = np.zeros(len(pooled), dtype=bool)
        mask[list(chosen)] = True
        reached.append(abs(float(pooled[mask].mean() - pooled[~mask].mean())) >= observed - tie)
    return float(np.mean(reached))


def seed_test(a: Sequence[float], b: Sequence[float], alpha_mde: float) -> dict:
    """B - A of one cell from per-run values: mean difference, 95% t interval over seeds, two-sided p,
    and the minimum detectable effect at two-sided level ``alpha_mde`` and ``POWER``."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a).all() and np.isfinite(b).all() and min(len(a), len(b)) >= MIN_REPLICATES
    out = {"a": float(a.mean()) if len(a) else None, "b": float(b.mean()) if len(b) else None,
           "a_per_run": [float(x) for x in a], "b_per_run": [float(x) for x in b],
           "delta": float(b.mean() - a.mean()) if len(a) and len(b) else None, "test": "welch t",
           "ci95": None, "p": None, "se": None, "df": None, "mde": None}
    if not ok:
        return out
    va, vb = float(a.var(ddof=1)) / len(a), float(b.var(ddof=1)) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else float(len(a) + len(b) - 2)
    delta = out["delta"]
    out.update(se=se, df=df)
    if va == 0.0 and vb == 0.0:  # every run on each side agrees to the last digit: no t
        out.update(p=_relabel_p(a, b), ci95=[delta, delta], mde=None,
                   test="exact relabelling test (no seed spread on either side, so no t)")
        return out
    t = delta / se
    half = _t_quantile(0.975, df) * se
    out.update(p=float(2 * stats.t.sf(abs(t), df)), ci95=[delta - half, delta + half],
               mde=(_t_quantile(1 - alpha_mde / 2, df) + _t_quantile(POWER, df)) * se)
    return out


def group_cells(values_a: Dict[str, List[float]], values_b: Dict[str, List[float]], q: float,
                cells: int) -> Dict[str, dict]:
    """``seed_test`` per metric of one slice cell (the metrics both sides measured)."""
    alpha = q / max(cells, 1)
    return {m: seed_test(values_a[m], values_b[m], alpha) for m in sorted(set(values_a) & set(values_b))}


def describe_power(n_a: int, n_b: int) -> Optional[str]:
    """One line when the replicate count leaves the test weak (None otherwise)."""
    n = min(n_a, n_b)
    if n < MIN_REPLICATES:
        return f"{n} run(s) on one side: a seed-level test needs at least {MIN_REPLICATES} per side"
    if n < 3:
        return f"{n} runs per side: about {n_a + n_b - 2} degrees of freedom at best, only large effects are found"
    return None
