"""The statistics of attribution verdicts: a one-draw test over seeds, multiple-testing corrections, resolution.

For one removed value and one seed ``s`` the paired difference is ``d_s = metric(value removed, s) -
metric(as many random rows removed, s)``, both arms trained from the same initialisation on the full arm's
row order with their rows deleted, the control's random rows a fresh draw per seed. The value's rows are
the same at every seed: they are *one draw*. Under "this value's rows are like a random subset of the same
size" ``d_s = a_v - a_{R_s} + e_s``, where ``a`` is a subset's own effect (spread ``sigma_a`` over random
subsets) and ``e_s`` training noise; ``a_v`` is one draw of ``a``, shared by every seed, so the mean of
``d_s`` varies by ``sigma_a^2 + (sigma_a^2 + sigma_e^2) / seeds``, not by the seed spread over ``seeds``
alone (a one-sample t over seeds tests "is this exact subset different from the average random subset",
false for almost any fixed subset). :func:`one_draw_test` estimates both parts (docs/attribution.md).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

DEFAULT_SEEDS = 8  # docs/attribution.md "Seeds and power" and its calibration matrix
ALPHA = 0.05  # family-wise error rate of the verdicts (Holm) or their false-discovery rate (BH)
POWER = 0.80  # the power at which the smallest detectable effect is stated
DRAWS = 20000  # pivot draws of the one-draw test's generalized p-value (seeded: the same inputs give the same p)
CORRECTIONS = ("holm", "bh")


def one_draw_tests(cells: Sequence[dict], alpha: float = ALPHA, family: int = 1, draws: int = DRAWS,
                   seed: int = 0) -> List[dict]:
    """Whether each fixed row subset differs from random subsets of its size, counting each as one draw.

    ``cells[i]``: per seed, ``diffs`` (value arm minus control arm, the control a fresh random subset per
    seed), ``within`` (value arm minus full arm: the value's rows are fixed, so their spread is training
    noise alone) and ``random`` (control arm minus full arm: a random subset's effect plus the same kind of
    noise), and ``removed``/``total`` (rows removed of the train rows). The subset variance is what
    ``random`` spreads beyond ``within``; for ``n`` of ``N`` rows it is ``kappa * n (N - n) / (N - 1)``
    (finite-population scaling of a sum of row effects), so the cells of one call share ``kappa`` and the
    noise. Under the null (the value's rows are one random subset) the mean of ``diffs`` varies by
    ``sigma_a^2 + var(diffs) / seeds``; the subset part is counted with ``1 + 1/seeds`` (a margin that keeps
    the placebo rate at or below alpha where seed noise and subset spread are alike). The p-value is a
    generalized (fiducial) one: the variances are drawn from their chi-square pivots (seeded, ``draws``
    times) and the normal tail averaged over them (docs/attribution.md).
    """
    import numpy as np
    from scipy import stats

    out = [{"n_seeds": len(c["diffs"]), "mean": float(np.mean(c["diffs"])) if len(c["diffs"]) else float("nan"),
            "sd": None, "se": None, "subset_sd": None, "noise_sd": None, "ci95": None, "p": None, "mde": None,
            "test": "one-draw generalized t", "pooled_cells": len(cells)} for c in cells]
    m = min((len(c["diffs"]) for c in cells), default=0)
    if m < 3 or any(len(c["diffs"]) != m or len(c["within"]) != m or len(c["random"]) != m for c in cells):
        return out  # two seeds leave one degree of freedom for two variance parts
    var_d = np.array([np.var(c["diffs"], ddof=1) for c in cells])
    var_x = np.array([np.var(c["within"], ddof=1) for c in cells])
    var_y = np.array([np.var(c["random"], ddof=1) for c in cells])
    h = np.array([max(1e-12, c["removed"] * (c["total"] - c["removed"]) / max(1, c["total"] - 1)) for c in cells])
    means = np.array([o["mean"] for o in out])
    k = len(cells)
    rng = np.random.default_rng(seed)
    tau2 = (m - 1) * var_d[:, None] / rng.chisquare(m - 1, (k, draws))
    spread2 = (m - 1) * var_y[:, None] / rng.chisquare(m - 1, (k, draws))
    noise2 = (m - 1) * var_x.sum() / rng.chisquare(k * (m - 1), draws)
    kappa = np.maximum(0.0, (spread2 - noise2).sum(axis=0)) / h.sum()
    null_var = kappa * h[:, None] * (1.0 + 1.0 / m) + tau2 / m
    z = np.abs(rng.standard_normal((k, draws))) * np.sqrt(null_var)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.mean(2.0 * stats.norm.sf(np.abs(means)[:, None] / np.sqrt(null_var)), axis=1)
    noise_hat = var_x.mean()
    kappa_hat = max(0.0, float((var_y - noise_hat).sum())) / h.sum()
    level = alpha / max(family, 1)
    for i, o in enumerate(out):
        subset = kappa_hat * h[i]
        se = float(np.sqrt(subset * (1.0 + 1.0 / m) + var_d[i] / m))
        half = float(np.quantile(z[i], 0.95))
        o.update(sd=float(np.sqrt(var_d[i])), se=se, subset_sd=float(np.sqrt(subset)), noise_sd=float(np.sqrt(noise_hat)),
                 ci95=[o["mean"] - half, o["mean"] + half], p=float(min(1.0, p[i])) if np.isfinite(p[i]) else 1.0,
                 mde=float(np.quantile(z[i], 1.0 - level)) + float(stats.norm.ppf(POWER)) * se)
    return out


def one_draw_test(diffs: Sequence[float], within: Sequence[float], random: Sequence[float], removed: int, total: int,
                  alpha: float = ALPHA, family: int = 1) -> dict:
    """:func:`one_draw_tests` of one subset alone (its own seeds estimate both variance parts)."""
    return one_draw_tests([{"diffs": list(diffs), "within": list(within), "random": list(random),
                            "removed": removed, "total": total}], alpha, family)[0]


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
