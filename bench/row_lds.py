"""The linear datamodeling score (LDS) of each row score: does the sum of a method's scores over the kept rows
predict the target loss that retraining on those rows measures?

``python -m bench.row_lds [--kind cls|sft] [--subsets 50]``. Design (the field's yardstick: TRAK, Kronfluence):
- the parent: the tiny fixture Run of ``bench.row_attribution`` (no planted errors), scored by every method
  (``--methods all``: tracin, tracin_adam and the suspect-row scores as baselines);
- ``subsets`` random half-subsets of the train rows, each drawn from a keyed generator (seed, index), and
  the parent's config retrained on each (same seed: the same initialisation, and the keyed row order, so an
  arm differs from the parent only in its rows);
- the measured quantity: each retrained Run's mean per-row loss on the target rows (the test split), read
  from its predictions; the predicted one: the sum of a method's scores over the kept rows;
- per method, the Spearman correlation of the two over the subsets, with a percentile bootstrap 95%
  interval that resamples subsets (the subset is the unit: each is one retraining).
Anchors (GPT-2 on WikiText): Kronfluence reports LDS 0.44 for EK-FAC and 0.12 for a gradient dot product.
Cost: 1 + ``subsets`` train runs plus one row-attribution call; about 50 x 3 s on the tiny BERT and 50 x
8 min on SmolLM2-135M on 2 CPU cores (what the SmolLM2 cell needs: a GPU, or hours).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

RESULTS = Path(__file__).resolve().parent / "results"


def half_subsets(rows: int, count: int, seed: int):
    """(count, rows) booleans, each row set exactly half of the rows, from a keyed generator per subset."""
    import numpy as np

    masks = np.zeros((count, rows), dtype=bool)
    for k in range(count):
        digest = hashlib.sha256(f"verifily-lds/{seed}/{k}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        masks[k, rng.choice(rows, size=rows // 2, replace=False)] = True
    return masks


def predicted_effect(scores, masks):
    """Per subset, the sum of the scores over its kept rows (an attribution score's linear prediction)."""
    import numpy as np

    return masks.astype(float) @ np.asarray(scores, dtype=float)


def lds(predicted, measured, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Spearman correlation of predicted and measured target loss over subsets, with a percentile bootstrap 95%
    interval over subsets (NaN when either side is constant)."""
    import numpy as np
    from scipy import stats

    predicted, measured = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    point = float(stats.spearmanr(predicted, measured).statistic)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(predicted), len(predicted))
        if np.ptp(predicted[pick]) > 0 and np.ptp(measured[pick]) > 0:
            draws.append(stats.spearmanr(predicted[pick], measured[pick]).statistic)
    low, high = (np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan")))
    return {"lds": point, "ci95": [float(low), float(high)], "subsets": int(len(predicted))}


def run_lds(kind: str, model: Path, root: Path, subsets: int, seed: int = 0) -> dict:
    """Train the parent, score its rows, retrain on ``subsets`` half-subsets; LDS per method."""
    import pandas as pd
    import yaml

    from bench.row_attribution import SIZES, _cls_rows, _config, _sft_rows
    from verifily_train.attribution import per_example
    from verifily_train.attribution import rows as row_attribution
    from verifily_train.fixtures.data import write_jsonl
    from verifily_train.fixtures.runs import train_run

    task = "classification" if kind == "cls" else "sft"
    work = root / f"lds-{kind}"
    shutil.rmtree(work, ignore_errors=True)
    os.environ["VERIFILY_HOME"] = str(work / "home")  # the arms' store versions stay in the bench's folder
    rng = random.Random(f"lds/{kind}/{seed}")
    make = _cls_rows if kind == "cls" else _sft_rows
    paths = {split: write_jsonl(work / "data" / f"{split}.jsonl", make(n, rng, 0.0, split))
             for split, n in SIZES[kind].items()}
    config = _config(task, model, paths, 1000 + seed, 4)
    (work / "train.yaml").write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    parent = train_run(work / "train.yaml", work / "cache", work / "runs")
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    plan = row_attribution.plan_row_attribution(parent, cache_root=work / "cache", checkpoints=4)
    merged = row_attribution.attribute_rows(plan, work / "scores")
    scoring_seconds = time.perf_counter() - started
    table = pd.read_parquet(Path(merged["dir"]) / merged["file"])
    lines = [line for line in Path(paths["train"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    masks = half_subsets(len(lines), subsets, seed)
    measured = []
    for k, mask in enumerate(masks):
        arm = work / f"subset-{k}"
        kept = write_jsonl(arm / "train.jsonl", [json.loads(line) for line, keep in zip(lines, mask) if keep])
        arm_config = dict(config, data_paths=dict(config["data_paths"], train=str(kept)))
        (arm / "train.yaml").write_text(yaml.safe_dump(arm_config))
        run = train_run(arm / "train.yaml", work / "cache", work / "runs")
        measured.append(float(per_example(run, task)["loss"].mean()))
    methods = {}
    for method in plan.methods:
        methods[method] = dict(lds(predicted_effect(table[f"score_{method}"].to_numpy(), masks), measured),
                               family=row_attribution.FAMILIES[method])
    return {"kind": kind, "subsets": subsets, "train_rows": len(lines), "methods": methods,
            "measured_loss": measured, "train_seconds": round(train_seconds, 2),
            "scoring_seconds": round(scoring_seconds, 2),
            "cost_in_train_runs": {"scores": round(scoring_seconds / train_seconds, 3), "lds_itself": subsets + 1}}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("cls", "sft"), default="cls")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--root", default=None)
    args = parser.parse_args(argv)
    import tempfile

    from bench.row_attribution import build_models

    root = Path(args.root or tempfile.mkdtemp(prefix="verifily-lds-"))
    models = build_models(root / "models")
    result = run_lds(args.kind, models[args.kind], root, args.subsets)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"row-lds-{args.kind}.json").write_text(json.dumps(result, indent=1))
    print(f"| method | family | LDS (Spearman, {args.subsets} half-subsets) [95% bootstrap over subsets] |")
    print("|---|---|---|")
    for method, entry in result["methods"].items():
        print(f"| {method} | {entry['family']} | {entry['lds']:+.3f} [{entry['ci95'][0]:+.3f}, {entry['ci95'][1]:+.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
