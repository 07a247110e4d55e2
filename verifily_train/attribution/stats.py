"""The statistics of attribution verdicts: a seed-level paired test, multiple-testing corrections, resolution.

The seed is the unit of evidence. For one removed value and one seed ``s`` the paired difference is
``d_s = metric(value removed, s) - metric(as many random rows removed, s)``, both arms trained from the
same initialisation on the full arm's row order with their rows deleted. Under "this value's rows are
no different from average rows" the ``d_s`` are centred on zero, so a one-sample Student t test over the
seeds (exact quantiles, scipy) holds its level; the test-row bootstrap only describes these models.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

DEFAULT_SEEDS = 8  # docs/attribution.md "Seeds and power": measured power >= 80% where 5 seeds gave 75%
ALPHA = 0.05  # family-wise error rate of the verdicts (Holm) or their false-discovery rate (BH)
SLICE_Q = 0.10  # Benjamini-Hochberg level of the descriptive per-slice stars
POWER = 0.80  # the power at which the smallest detectable effect is stated
CORRECTIONS = ("holm", "bh")


def seed_test(diffs: Sequence[float], alpha: float = ALPHA, family: int = 1) -> dict:
    """Mean, Student-t 95% interval, two-sided p and the smallest detectable effect of per-seed differences.

    ``mde`` is the true mean difference this many seeds would detect with probability ``POWER`` at the
    level ``alpha / family`` (the strictest step of Holm's procedure), given the observed seed spread.
    """
    from scipy import stats

    n = len(diffs)
    mean = float(sum(diffs) / n) if n else float("nan")
    out = {"n_seeds": n, "mean": mean, "sd": None, "ci95": None, "p": None, "mde": None}
    if n < 2:
        return out
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    if se == 0.0:
        p = 1.0 if mean == 0.0 else 0.0  # identical differences at every seed: no spread to test against
    else:
        p = float(2.0 * stats.t.sf(abs(mean) / se, n - 1))
    level = alpha / max(family, 1)
    mde = (float(stats.t.ppf(1.0 - level / 2.0, n - 1)) + float(stats.t.ppf(POWER, n - 1))) * se
    out.update(sd=sd, ci95=[mean - half, mean + half], p=p, mde=mde)
    return out


def adjust(pvalues: Sequence[Optional[float]], method: str) -> List[Optional[float]]:
    """Holm (family-wise) or Benjamini-Hochberg (false discovery rate) adjusted p-values; None stays None."""
    from scipy import stats

    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}")
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    out: List[Optional[float]] = [None] * len(pvalues)
    if not idx:
        return out
    ps = [float(pvalues[i]) for i in idx]
    if method == "bh":
        adjusted = [float(x) for x in stats.false_discovery_control(ps, method="bh")]
    else:
        m = len(ps)
        order = sorted(range(m), key=ps.__getitem__)
        adjusted = [0.0] * m
        running = 0.0
        for rank, j in enumerate(order):
            running = max(running, min(1.0, (m - rank) * ps[j]))
            adjusted[j] = running
    for i, a in zip(idx, adjusted):
        out[i] = a
    return out


def row_bootstrap(diff, samples: int, seed: int) -> Optional[List[float]]:
    """Percentile 95% interval of the mean per-row difference: test-set precision of these models only."""
    import numpy as np

    if samples <= 0 or len(diff) < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(samples, len(diff)))
    means = diff[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def binomial_interval(successes: int, trials: int) -> Dict[str, Optional[float]]:
    """A rate with its exact (Clopper-Pearson) 95% interval, for calibration figures."""
    from scipy import stats

    if trials == 0:
        return {"rate": None, "ci95": None, "k": 0, "n": 0}
    ci = stats.binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="exact")
    return {"rate": successes / trials, "ci95": [float(ci.low), float(ci.high)], "k": successes, "n": trials}
