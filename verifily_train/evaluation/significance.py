"""Paired tests of "B differs from A on these rows" per metric, and one Benjamini–Hochberg correction over them.

The row-level test is the paired permutation (swap) test: under its null, A's and B's scores on each row
are exchangeable, so swapping them on any subset of rows leaves the metric delta's distribution unchanged.
It is exact in finite samples and works for every metric, including the token-weighted loss (a ratio of
sums) and macro-F1 (not a mean of per-row values). For a 0/1 per-row metric (accuracy, exact match,
format compliance) its exact distribution is the exact McNemar test (Binomial(discordant, 1/2) flips,
from ``stats.binom``). Elsewhere the swaps are enumerated when there are at most ``resamples`` of them
(2**n), else drawn at random.

This answers "do *these two models* differ on these rows?" (the question of which checkpoint to ship),
exactly. It says nothing about whether the data or config change between them caused the difference: two
runs that differ only in their seed are two different models too (bench/aa.py measures how often they
"differ"). That question needs replicate runs per side: ``evaluation/replicates.py``.

``stats.permutation_test(permutation_type="samples")`` computes the same row-level test; it was measured
at 1.5 s per metric for 2,000 rows and 9,999 swaps (it permutes through argsort), against ~0.05 s here:
one 0/1 swap matrix per batch, shared by the cell's metrics, and sums of swapped rows as one matrix product.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from verifily_train.config.metricspec import (LABEL_MATCH, METRICS, PER_ROW_KINDS, ROW_MEAN, TOKEN_WEIGHTED, MetricSpec,
                                              metric, metrics_for, tested_as)
from verifily_train.evaluation.bootstrap import statistic, statistics_for

# a monotone function of another metric (perplexity = exp(loss)) is one hypothesis with it: one test, one star
SAME_TEST_AS = {spec.name: spec.function_of for spec in METRICS if spec.function_of}
BATCH_ENTRIES = 4_000_000  # swap-matrix entries per batch: memory stays flat as the test set grows
RELATIVE_TIE = 1e-9  # |delta*| within this of |delta| counts as reaching it (float sums in another order)


def per_row_score(spec: MetricSpec, frame) -> Optional[np.ndarray]:
    """A per-row kind's score on each row (its metric is their mean); None for other kinds or a missing column."""
    if spec.kind == LABEL_MATCH:
        return (frame["label_id"].to_numpy() == frame["pred_id"].to_numpy()).astype(np.float64)
    if spec.kind == ROW_MEAN and spec.column in frame and frame[spec.column].notna().all():
        return frame[spec.column].to_numpy(np.float64)
    return None


def per_row_scores(task: str, frame) -> Dict[str, np.ndarray]:
    """Each mean-type metric's per-row score (its overall value is the mean of these)."""
    out = {}
    for spec in metrics_for(task):
        scores = per_row_score(spec, frame)
        if scores is not None:
            out[spec.name] = scores
    return out


def _beyond(bar: float, centres: np.ndarray, spread: float) -> np.ndarray:
    """P(|c + theta| >= bar) for each centre c, theta ~ N(0, spread^2) (spread 0: the indicator)."""
    from scipy import stats

    if spread <= 0:
        return (np.abs(centres) >= bar * (1 - RELATIVE_TIE)).astype(np.float64)
    return stats.norm.sf((bar - centres) / spread) + stats.norm.cdf((-bar - centres) / spread)


class McNemarTest:
    """The exact swap test of a 0/1 metric: under the null each discordant row is an even coin."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        self.n = len(a)
        self.up, self.down = int(((a == 0) & (b == 1)).sum()), int(((a == 1) & (b == 0)).sum())
        self.discordant = self.up + self.down
        self.delta = (self.up - self.down) / self.n  # B - A of the metric
        self.null_sd = math.sqrt(self.discordant) / self.n

    def pvalue(self, between_sd: float = 0.0) -> float:
        """P(|delta* + theta| >= |delta|): delta* the exact swap null (Binomial(discordant, 1/2) flips),
        theta ~ N(0, between_sd^2) the part of the delta that moves every cell alike (seed noise)."""
        from scipy import stats

        m = self.discordant
        if m == 0 and between_sd <= 0:
            return 1.0
        u = np.arange(m + 1)
        null = (2 * u - m) / self.n
        return float(min(1.0, np.sum(stats.binom.pmf(u, m, 0.5) * _beyond(abs(self.delta), null, between_sd))))


class SwapTest:
    """The swap test of any metric from its null samples: every swap pattern, or ``resamples`` drawn ones."""

    def __init__(self, observed: float, null: np.ndarray, exact: bool):
        self.delta, self.null, self.exact = observed, null, exact
        self.null_sd = math.sqrt(float(np.mean(null ** 2))) if len(null) else 0.0  # the null is centred on 0

    def pvalue(self, between_sd: float = 0.0) -> float:
        """P(|delta* + theta| >= |delta|) over the swaps (drawn: the observed labelling counts as one draw),
        theta ~ N(0, between_sd^2) as in ``McNemarTest.pvalue``."""
        reached = float(np.sum(_beyond(abs(self.delta), self.null, between_sd)))
        if self.exact:
            return reached / len(self.null)
        return (reached + float(_beyond(abs(self.delta), np.array([self.delta]), between_sd)[0])) / (len(self.null) + 1)


def mcnemar_exact_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value of paired 0/1 outcomes: the swap test's exact distribution for them."""
    return McNemarTest(a, b).pvalue()


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())


def swap_batches(n: int, resamples: int, seed: int) -> Tuple[Iterator[np.ndarray], bool]:
    """(m, n) 0/1 batches (1: swap A and B on that row), and whether they enumerate all 2**n swaps."""
    batch = max(1, BATCH_ENTRIES // max(n, 1))
    if n < 63 and 2 ** n <= resamples:
        codes = np.arange(2 ** n, dtype=np.int64)

        def every():
            for start in range(0, len(codes), batch):
                yield ((codes[start:start + batch, None] >> np.arange(n)) & 1).astype(np.float64)
        return every(), True
    rng = np.random.default_rng(seed)

    def drawn():
        for start in range(0, resamples, batch):
            m = min(batch, resamples - start)
            bits = np.unpackbits(rng.integers(0, 256, size=(m, (n + 7) // 8), dtype=np.uint8), axis=1)
            yield bits[:, :n].astype(np.float64)
    return drawn(), False


def _swapped_deltas(task: str, frame_a, frame_b, labels: List[str], names: List[str]):
    """For each tested metric, a function from a swap batch to B* - A* per swap pattern."""
    n = len(frame_a)
    fns = {}
    rows_a, rows_b = per_row_scores(task, frame_a), per_row_scores(task, frame_b)
    stacked = None
    for name in names:
        if name in rows_a and name in rows_b:
            diff = rows_b[name] - rows_a[name]
            fns[name] = lambda swaps, d=diff: (d.sum() - 2.0 * (swaps @ d)) / n
        elif metric(name).kind == TOKEN_WEIGHTED:
            fns[name] = _swapped_ratio(frame_a, frame_b)
        elif metric(name).kind not in PER_ROW_KINDS:
            # not a sum over rows (macro-F1): index the stacked A+B frame and reuse its resampling statistic
            import pandas as pd

            if stacked is None:
                stacked = pd.concat([frame_a, frame_b], ignore_index=True)
            fns[name] = _swapped_statistic(statistic(metric(name), stacked, labels), n)
    return fns


def _swapped_ratio(frame_a, frame_b):
    """B* - A* of the token-weighted loss (a ratio of sums): swapping row i moves its difference from B to A."""
    num_a, num_b = frame_a["loss_sum"].to_numpy(np.float64), frame_b["loss_sum"].to_numpy(np.float64)
    den_a, den_b = frame_a["n_tokens"].to_numpy(np.float64), frame_b["n_tokens"].to_numpy(np.float64)
    dnum, dden = num_b - num_a, den_b - den_a

    def loss(swaps):
        moved_num, moved_den = swaps @ dnum, swaps @ dden
        loss_b = (num_b.sum() - moved_num) / np.maximum(den_b.sum() - moved_den, 1e-12)
        loss_a = (num_a.sum() + moved_num) / np.maximum(den_a.sum() + moved_den, 1e-12)
        return loss_b - loss_a

    return loss


def _swapped_statistic(stat, n: int):
    """B* - A* of any statistic over the stacked A+B frame (A's rows first, then B's)."""
    rows = np.arange(n)

    def swapped(swaps):
        s = swaps.astype(bool)
        return stat(np.where(s, rows, rows + n)) - stat(np.where(s, rows + n, rows))

    return swapped


def paired_tests(task: str, frame_a, frame_b, labels: List[str], resamples: int, seed: int) -> Dict[str, object]:
    """The swap test of B - A per metric on aligned rows (exact when 2**n <= resamples or the metric is 0/1)."""
    n = len(frame_a)
    if n == 0 or resamples <= 0:
        return {}
    both = set(statistics_for(task, frame_a, labels)) & set(statistics_for(task, frame_b, labels))
    names = sorted(name for name in both if tested_as(name) == name)
    rows_a, rows_b = per_row_scores(task, frame_a), per_row_scores(task, frame_b)
    out: Dict[str, object] = {}
    for name in names:
        if name in rows_a and name in rows_b and _is_binary(rows_a[name]) and _is_binary(rows_b[name]):
            out[name] = McNemarTest(rows_a[name], rows_b[name])
    deltas = _swapped_deltas(task, frame_a, frame_b, labels, [m for m in names if m not in out])
    observed = {name: float(fn(np.zeros((1, n)))[0]) for name, fn in deltas.items()}
    deltas = {name: fn for name, fn in deltas.items() if math.isfinite(observed[name])}
    null: Dict[str, list] = {name: [] for name in deltas}
    batches, exact = swap_batches(n, resamples, seed)
    for swaps in batches:
        for name, fn in deltas.items():
            null[name].append(fn(swaps))
    for name in deltas:
        out[name] = SwapTest(observed[name], np.concatenate(null[name]), exact)
    return out


def paired_permutation_pvalues(task: str, frame_a, frame_b, labels: List[str], resamples: int,
                               seed: int) -> Dict[str, float]:
    """Two-sided p-value of B - A per metric on aligned rows, against row-level noise alone."""
    return {name: test.pvalue() for name, test in paired_tests(task, frame_a, frame_b, labels, resamples, seed).items()}


def benjamini_hochberg(pvalues: Sequence[float]) -> List[float]:
    """BH-adjusted p-values (``stats.false_discovery_control``, method 'bh'), in the input order."""
    from scipy import stats

    if len(pvalues) == 0:
        return []
    return [float(p) for p in stats.false_discovery_control(np.asarray(pvalues, dtype=np.float64), method="bh")]


def mark_discoveries(cells: Sequence[dict], q: float) -> int:
    """Set ``p_adjusted`` and ``significant`` (adjusted p <= q) on every cell with a ``p``; return the discoveries."""
    tested = [c for c in cells if c.get("p") is not None]
    for cell, adjusted in zip(tested, benjamini_hochberg([c["p"] for c in tested])):
        cell["p_adjusted"] = adjusted
        cell["significant"] = adjusted <= q
    for cell in cells:
        if cell.get("p") is None:
            cell["p_adjusted"], cell["significant"] = None, False
    return sum(1 for c in tested if c["significant"])
