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

import math
from typing import Dict, List, Optional, Sequence

DEFAULT_SEEDS = 8  # docs/attribution.md "Seeds and power" and its calibration matrix
DEFAULT_CONTROLS = 2  # random-subset control arms per removed size and seed (docs/attribution.md "Seeds and power")
ALPHA = 0.05  # family-wise error rate of the verdicts (Holm) or their false-discovery rate (BH)
POWER = 0.80  # the power at which the smallest detectable effect is stated
DRAWS = 20000  # pivot draws of the one-draw test's generalized p-value (seeded: the same inputs give the same p)
SUBSET_MARGIN = 1.5  # the subset variance counted 1.5 times: with DEFAULT_CONTROLS, the smallest margin whose every
                     # simulated placebo cell stays at or below 5% (docs/attribution.md, bench.logistic_sim controls)
SUBSET_FLOOR = 0.25  # the subset variance is at least a quarter of the controls' whole spread: where the value's own
                     # arm happens to spread more over seeds than the controls do, var(y) - var(x) is <= 0 and the
                     # null would shrink to the seed-only t the one-draw test replaced (docs/attribution.md)
CORRECTIONS = ("holm", "bh")


def one_draw_test(diffs: Sequence[float], within: Sequence[float], random: Sequence[float], alpha: float = ALPHA,
                  family: int = 1, draws: int = DRAWS, seed: int = 0, margin: float = SUBSET_MARGIN,
                  floor: float = SUBSET_FLOOR) -> dict:
    """Whether a fixed row subset differs from random subsets of its size, counting it as one draw.

    Per seed: ``diffs`` (value arm minus the mean of its control arms, each control a fresh random subset),
    ``within`` (value arm minus full arm: the value's rows are fixed, so their spread is training noise
    alone); ``random`` holds every control run's effect (control arm minus full arm: a random subset's effect
    plus the same kind of noise), ``seeds x controls`` of them. The subset variance ``sigma_a^2`` is what ``random`` spreads beyond ``within``. Under the null
    (the value's rows are one random subset) the mean of ``diffs`` varies by ``sigma_a^2 + var(diffs) /
    seeds``; the subset part is counted ``SUBSET_MARGIN`` (1.5) times and is at least ``SUBSET_FLOOR`` (a
    quarter) of the controls' whole spread. The p-value is a generalized (fiducial)
    one: the three variances are drawn from their chi-square pivots (seeded, ``draws`` times: the same
    inputs give the same p) and the normal tail is averaged over them (docs/attribution.md).
    """
    import numpy as np
    from scipy import stats

    m = len(diffs)
    mean = float(np.mean(diffs)) if m else float("nan")
    out = {"n_seeds": m, "mean": mean, "sd": None, "se": None, "subset_sd": None, "noise_sd": None, "ci95": None,
           "p": None, "mde": None, "test": "one-draw generalized test"}
    if m < 3 or len(within) != m or not random or len(random) % m:
        return out  # two seeds leave one degree of freedom for two variance parts
    var_d, var_x, var_y = (float(np.var(v, ddof=1)) for v in (diffs, within, random))
    rng = np.random.default_rng(seed)
    k = len(random)  # every control run's effect: seeds x controls per seed
    tau2, spread2, noise2 = (df * v / rng.chisquare(df, draws) for v, df in ((var_d, m - 1), (var_y, k - 1),
                                                                             (var_x, m - 1)))
    null_var = margin * np.maximum(floor * spread2, spread2 - noise2) + tau2 / m
    z = np.abs(rng.standard_normal(draws)) * np.sqrt(null_var)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = float(np.mean(2.0 * stats.norm.sf(abs(mean) / np.sqrt(null_var))))
    subset = max(floor * var_y, var_y - var_x)
    se = math.sqrt(margin * subset + var_d / m)
    half = float(np.quantile(z, 0.95))
    level = alpha / max(family, 1)
    out.update(sd=math.sqrt(var_d), se=se, subset_sd=math.sqrt(subset), noise_sd=math.sqrt(var_x),
               ci95=[mean - half, mean + half], p=min(1.0, p) if math.isfinite(p) else 1.0,
               mde=float(np.quantile(z, 1.0 - level)) + float(stats.norm.ppf(POWER)) * se)
    return out


def rank_test(value_effect: float, random: Sequence[float], sign: float = -1.0) -> dict:
    """The distribution-free companion of :func:`one_draw_test`: where the value's removal effect (its mean over
    seeds) falls among the ``random`` control runs' effects (one random subset each).

    Under "the value's rows are one random subset of their size" the value and each control run are
    exchangeable draws, so the one-sided ``p = (1 + as_extreme) / (runs + 1)`` (``as_extreme``: the control runs
    at or beyond the value, on the side the value is on) is valid whatever the shape of the subset effects:
    exact without training noise, conservative with it (the value's mean over seeds is less noisy than one
    control run). ``sign`` is -1 where lower is better: "helps" is then a removal effect above the controls. It
    cannot go below ``1 / (runs + 1)`` (0.059 at the defaults' 16 runs; docs/attribution.md)."""
    runs = len(random)
    if not runs or value_effect != value_effect:
        return {"rank_p": None, "as_extreme": None, "runs": runs, "floor": None, "helps_p": None}
    helps = sum(1 for y in random if sign * y <= sign * value_effect)  # control runs at or beyond it, helps side
    hurts = sum(1 for y in random if sign * y >= sign * value_effect)
    return {"rank_p": (1 + min(helps, hurts)) / (runs + 1), "as_extreme": min(helps, hurts), "runs": runs,
            "floor": 1.0 / (runs + 1), "helps_p": (1 + helps) / (runs + 1)}


def claim_verdicts(values: Sequence[dict], alpha: float = ALPHA, correction: str = "holm") -> List[dict]:
    """The verdicts of one call: two one-sided claims per value, corrected together.

    Each value carries ``p`` (the one-draw test's two-sided p, normal model), ``harmful`` (removing the value did
    better than removing random rows), ``removal_effect`` and ``random`` (its control runs' effects) and
    ``sign`` (-1 where lower is better). The claims:
    - **hurts**: one-sided, from the normal model (``p / 2`` on the harmful side). Removing rows can break
      training but can only improve it so much, so random subsets' effects are right-skewed: the normal model
      holds its level on this, the light side (no false "hurts" in any calibration regime);
    - **helps**: one-sided and distribution-free, the rank p ``(1 + control runs at or beyond the value) /
      (runs + 1)``: on the heavy side the normal model does not hold its level (3 false "helps" in 40
      converged placebo calls, each beyond all its control runs; docs/attribution.md).
    A rank p cannot go below ``1 / (runs + 1)``, so a "helps" claim that could not reach its corrected level
    whatever the data is left out of the family (Tarone's rule; Gilbert 2005 for BH): at the defaults' 16 runs
    per size no "helps" is testable and the family is the values' "hurts" claims alone. Returns per value:
    ``verdict`` ("hurts", "helps" or None), ``p_adjusted`` (its claim's corrected p; for an untestable "helps"
    the rank p itself), ``helps_testable``, ``family`` (claims corrected together)."""
    claims = []  # (value index, side, one-sided p, smallest p the claim could reach)
    for i, v in enumerate(values):
        if v.get("p") is None:
            continue
        claims.append((i, "hurts", v["p"] / 2 if v["harmful"] else 1.0 - v["p"] / 2, 0.0))
        rank = rank_test(v["removal_effect"], v["random"], v["sign"])
        if rank["runs"]:
            claims.append((i, "helps", rank["helps_p"], rank["floor"]))
    k = 1
    while sum(1 for c in claims if c[3] <= alpha / k) > k:  # Tarone: the smallest family that admits itself
        k += 1
    family = [c for c in claims if c[3] <= alpha / k]
    adjusted = adjust([c[2] for c in family], correction)
    out = [{"verdict": None, "p_adjusted": None, "helps_testable": False, "family": len(family)} for _ in values]
    for (i, side, p1, _), p_adj in zip(family, adjusted):
        if side == "helps":
            out[i]["helps_testable"] = True
        mine = (side == "hurts") == bool(values[i]["harmful"])  # the claim on the side the value's effect is on
        if p_adj <= alpha:
            out[i].update(verdict=side, p_adjusted=p_adj)
        elif mine and out[i]["verdict"] is None:
            out[i]["p_adjusted"] = p_adj
    for i, v in enumerate(values):  # an untestable "helps": its rank p, unadjusted, says how far it got
        if out[i]["p_adjusted"] is None and v.get("p") is not None and not v["harmful"] and v["random"]:
            out[i]["p_adjusted"] = rank_test(v["removal_effect"], v["random"], v["sign"])["helps_p"]
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
