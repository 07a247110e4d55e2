"""The one-draw test on simulated arms: its placebo rate across noise regimes and its power, in seconds.

``python -m bench.one_draw_sim [--trials 2000] [--seeds 8]``. Exploration only (docs/attribution.md reports
the real pipeline's figures from bench/attribution.py): a Gaussian model of the attribution design, with
``value = a_v + u_s + e``, ``control = a_{R_s} + u_s + e``, ``full = u_s + e`` at each seed ``s``: ``a`` a row
subset's own effect (spread ``sigma_a`` over random subsets of the size), ``u_s`` the seed's shared part,
``e`` each arm's training noise (``sigma_e``). Under the null the value's rows are one random subset, so
``a_v`` is one draw. The ratio ``sigma_e / sigma_a`` sweeps from converged training (0) to seed noise
far above the subset spread. The same trials are judged by :func:`one_draw_test` (what the CLI uses) and by
the retired one-sample t over seeds. Results: bench/results/one_draw_sim.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (0.0, 0.3, 0.5, 0.7, 1.0, 2.0, 5.0)


def trial(rng, ratio: float, seeds: int, sizes: List[int], total: int, shift: float = 0.0, controls: int = 0):
    """One simulated call: per value the per-seed (value - controls' mean), (value - full) and every control's
    (control - full); the first value carries ``shift`` (in units of the subset spread) when it is a planted
    effect. ``controls``: random-subset controls per value and seed (0: the CLI's default)."""
    import numpy as np

    from verifily_train.attribution.stats import DEFAULT_CONTROLS

    k = controls or DEFAULT_CONTROLS
    cells = []
    u = rng.normal(0, 1, seeds)
    full = u + rng.normal(0, ratio, seeds)
    for i, n in enumerate(sizes):
        scale = np.sqrt(n * (total - n) / (total - 1)) / np.sqrt(total / 4)  # sigma_a(n); 1 at n = N/2
        a_v = rng.normal(0, scale) + (shift if i == 0 else 0.0)
        value = a_v + u + rng.normal(0, ratio, seeds)
        control = rng.normal(0, scale, (seeds, k)) + u[:, None] + rng.normal(0, ratio, (seeds, k))
        cells.append({"diffs": list(value - control.mean(1)), "within": list(value - full),
                      "random": list((control - full[:, None]).ravel())})
    return cells


def judge(cells, alpha: float = 0.05):
    """(any call by the one-draw test with Holm, any call by the retired t with Holm, first value called)."""
    from scipy import stats

    from verifily_train.attribution.stats import adjust, one_draw_test

    new = adjust([one_draw_test(c["diffs"], c["within"], c["random"], alpha, len(cells))["p"] for c in cells], "holm")
    old = adjust([float(stats.ttest_1samp(c["diffs"], 0.0).pvalue) for c in cells], "holm")
    return any(p <= alpha for p in new), any(p <= alpha for p in old), new[0] <= alpha, old[0] <= alpha


def main(argv=None) -> int:
    import numpy as np

    from verifily_train.attribution.stats import DEFAULT_SEEDS, binomial_interval

    parser = argparse.ArgumentParser(prog="python -m bench.one_draw_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS)
    parser.add_argument("--out", default=str(RESULTS / "one_draw_sim.json"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    designs = {"2 values (60/60 of 120)": ([60, 60], 120), "3 values (50/30/20% of 300)": ([150, 90, 60], 300),
               "1 value (40 of 120)": ([40], 120)}
    for name, (sizes, total) in designs.items():
        for ratio in RATIOS:
            calls = [judge(trial(rng, ratio, args.seeds, sizes, total)) for _ in range(args.trials)]
            rows.append({"design": name, "sigma_e/sigma_a": ratio, "kind": "placebo",
                         "one_draw_any_call": binomial_interval(sum(c[0] for c in calls), len(calls)),
                         "retired_t_any_call": binomial_interval(sum(c[1] for c in calls), len(calls))})
            print(f"{name} placebo ratio {ratio}: one-draw {rows[-1]['one_draw_any_call']['rate']:.3f}, "
                  f"retired t {rows[-1]['retired_t_any_call']['rate']:.3f}", flush=True)
    for ratio, shift in ((0.3, 3.0), (0.3, 4.0), (5.0, 10.0), (5.0, 15.0)):
        calls = [judge(trial(rng, ratio, args.seeds, [60, 60], 120, shift)) for _ in range(args.trials // 2)]
        rows.append({"design": "2 values (60/60 of 120)", "sigma_e/sigma_a": ratio, "kind": f"planted {shift:g} sigma_a",
                     "one_draw_power": binomial_interval(sum(c[2] for c in calls), len(calls)),
                     "retired_t_power": binomial_interval(sum(c[3] for c in calls), len(calls))})
        print(f"power ratio {ratio} shift {shift}: one-draw {rows[-1]['one_draw_power']['rate']:.3f}, "
              f"retired t {rows[-1]['retired_t_power']['rate']:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": {"trials": args.trials, "seeds": args.seeds, "alpha": 0.05,
                                                       "correction": "holm"}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
