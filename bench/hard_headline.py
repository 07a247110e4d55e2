"""Calibration of the hard-example headline: how often it names a tag value that is not over-represented.

``python -m bench.hard_headline [--trials 2000]`` (also ``python -m bench --only headline``). Each trial builds
a test set of 120 rows tagged ``source`` 50/30/20% (plus 10 untagged rows), draws per-row losses, and runs the
real ``mine_hard_examples`` (25 hardest rows, the default; BH at q = 0.10, >= 5 hard rows to headline):
- placebo: losses independent of the tag: any headline naming a value is a false discovery;
- planted: the 20% value's rows have their loss raised by ``--shift`` SDs: the headline should name it.
Rates come with exact Clopper-Pearson 95% intervals. Results: bench/results/hard_headline.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _frame(rng, shift: float):
    import numpy as np
    import pandas as pd

    sources = np.array(["human"] * 60 + ["synthetic"] * 36 + ["scraped"] * 24 + [None] * 10, dtype=object)
    loss = rng.normal(0.0, 1.0, len(sources)) + shift * (sources == "scraped")
    return pd.DataFrame({
        "example_id": [f"test:{i}" for i in range(len(sources))], "split": "test", "line": range(1, len(sources) + 1),
        "tags": [json.dumps({"source": s} if s else {}) for s in sources], "text": "", "reference": "",
        "prediction": "", "loss": loss, "tag.source": sources})


def run(trials: int, shift: float, seed: int = 0) -> dict:
    import numpy as np

    from verifily_train.attribution.stats import binomial_interval
    from verifily_train.evaluation.hard import mine_hard_examples

    rng = np.random.default_rng(seed)
    placebo = planted = planted_wrong = 0
    for _ in range(trials):
        if "come from" in mine_hard_examples("sft", _frame(rng, 0.0), 25, ["source"])["headline"]:
            placebo += 1
        headline = mine_hard_examples("sft", _frame(rng, shift), 25, ["source"])["headline"]
        planted += "come from source:scraped" in headline
        planted_wrong += "come from" in headline and "source:scraped" not in headline
    return {"trials": trials, "shift_sd": shift, "hard_examples": 25, "test_rows": 130,
            "placebo_headline_rate": binomial_interval(placebo, trials),
            "planted_named": binomial_interval(planted, trials),
            "planted_other_value_named": binomial_interval(planted_wrong, trials)}


def render(result: dict) -> str:
    def rate(r):
        return f"{r['k']}/{r['n']} = {r['rate']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]"

    return "\n".join([
        "| hard-example headline | measured (exact 95% CI) |", "|---|---|",
        f"| placebo (loss independent of tags): names a value | {rate(result['placebo_headline_rate'])} |",
        f"| planted (+{result['shift_sd']:g} SD on a 20% value): names it | {rate(result['planted_named'])} |",
        f"| planted: names another value | {rate(result['planted_other_value_named'])} |"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hard_headline", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--shift", type=float, default=1.0, help="planted loss shift, in SDs (default 1)")
    parser.add_argument("--out", default=str(RESULTS / "hard_headline.json"))
    args = parser.parse_args(argv)
    result = run(args.trials, args.shift)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
