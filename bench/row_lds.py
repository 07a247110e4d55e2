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
- ``--parents N``: N dataset draws (seeds), each its own parent and subsets; the summary is the mean LDS over
  parents with a stratified bootstrap (subsets resampled within each parent), the paired difference of each
  method against ``tracin`` on the same subsets, and a t interval over the parents; the attribution scores are
  also scored without projection (``<method>@exact``).
Anchors (GPT-2 on WikiText): Kronfluence reports LDS 0.44 for EK-FAC and 0.12 for a gradient dot product.
Cost: (1 + ``subsets``) train runs per parent plus the scoring calls: 1 to 2 s per tiny run on one CPU thread
(3 parents x 100 subsets: 6 to 9 minutes per model). ``--kind smollm2``: the shipped SFT example (example-sft,
the demo's config at 40 steps) on the embedded SmolLM2-135M-Instruct, about 50 s a run on both cores of this
CPU (one parent x 50 subsets: 72 minutes, plus 5 for scoring).
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


def lds_difference(predicted_a, predicted_b, measured, bootstrap: int = 1000, seed: int = 0) -> dict:
    """LDS(a) - LDS(b) on the same subsets, with a paired percentile bootstrap 95% interval over subsets."""
    import numpy as np
    from scipy import stats

    a, b, y = (np.asarray(x, dtype=float) for x in (predicted_a, predicted_b, measured))
    point = float(stats.spearmanr(a, y).statistic - stats.spearmanr(b, y).statistic)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(y), len(y))
        if np.ptp(a[pick]) > 0 and np.ptp(b[pick]) > 0 and np.ptp(y[pick]) > 0:
            draws.append(stats.spearmanr(a[pick], y[pick]).statistic - stats.spearmanr(b[pick], y[pick]).statistic)
    low, high = (np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan")))
    return {"difference": point, "ci95": [float(low), float(high)]}


def pooled(parents: List[dict], method: str, reference: str = "tracin", bootstrap: int = 1000, seed: int = 0) -> dict:
    """The mean LDS over parents (dataset draws) with a stratified bootstrap 95% interval (subsets resampled
    within each parent: the subsets' variance given these parents), the same for the paired difference against
    ``reference``, and the spread over parents (a Student t interval over the parents' LDS, the dataset draw
    being the unit)."""
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(seed)
    data = [(np.asarray(p["predicted"][method]), np.asarray(p["predicted"][reference]), np.asarray(p["measured_loss"]))
            for p in parents]

    def statistic(picks):
        own, diff = [], []
        for (a, b, y), pick in zip(data, picks):
            ra, rb = stats.spearmanr(a[pick], y[pick]).statistic, stats.spearmanr(b[pick], y[pick]).statistic
            own.append(ra)
            diff.append(ra - rb)
        return float(np.mean(own)), float(np.mean(diff))

    point = statistic([np.arange(len(y)) for _, _, y in data])
    draws = np.array([statistic([rng.integers(0, len(y), len(y)) for _, _, y in data]) for _ in range(bootstrap)])
    per_parent = [p["methods"][method]["lds"] for p in parents]
    out = {"lds": point[0], "ci95": [float(x) for x in np.nanpercentile(draws[:, 0], [2.5, 97.5])],
           "minus_" + reference: point[1],
           "minus_" + reference + "_ci95": [float(x) for x in np.nanpercentile(draws[:, 1], [2.5, 97.5])],
           "per_parent": per_parent}
    if len(per_parent) > 1:
        half = stats.t.ppf(0.975, len(per_parent) - 1) * np.std(per_parent, ddof=1) / np.sqrt(len(per_parent))
        out["over_parents_t95"] = [float(np.mean(per_parent) - half), float(np.mean(per_parent) + half)]
    return out


SMOLLM2_STEPS = 40  # example-sft's training.max_steps (bench.row_agreement): half the demo's 80


def row_hash_of(line: str) -> str:
    """The row hash the scores' parquet records for one train line."""
    from verifily_train.model.tokenize import row_hash

    return row_hash(json.loads(line))


def _exact_and_alone(parent, plan, work: Path, scores: dict):
    """The scores again without the random projection (exact inner products: the tiny adapters are small), added
    to ``scores`` as ``<method>@exact``, and each method's own cost (a call computing it alone)."""
    import pandas as pd

    from verifily_train.attribution import rows as row_attribution

    # the same gradients without the random projection (exact inner products: the tiny adapters are small)
    exact_plan = row_attribution.plan_row_attribution(parent, cache_root=work / "cache", checkpoints=4,
                                                      projection_dim=0, methods=["tracin", "tracin_adam"])
    exact_merged = row_attribution.attribute_rows(exact_plan, work / "scores-exact")
    exact = pd.read_parquet(Path(exact_merged["dir"]) / exact_merged["file"])
    scores.update({f"{m}@exact": exact[f"score_{m}"].to_numpy() for m in exact_plan.methods})
    # each method's own cost (a call computing it alone; tracin, tracin_adam and self_influence share the
    # gradient passes when computed together), over the parent's train stage seconds (model load and training)
    method_seconds = {}
    for method in plan.methods:
        started = time.perf_counter()
        alone = row_attribution.plan_row_attribution(parent, cache_root=work / "cache", checkpoints=4, methods=[method])
        row_attribution.attribute_rows(alone, work / f"alone-{method}")
        method_seconds[method] = time.perf_counter() - started
    return method_seconds


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
    work = root / f"lds-{kind}-{seed}"
    shutil.rmtree(work, ignore_errors=True)
    os.environ["VERIFILY_HOME"] = str(work / "home")  # the arms' store versions stay in the bench's folder
    if kind == "smollm2":  # the shipped SFT example: the demo's train.yaml at example-sft's 40 steps
        from bench.row_agreement import _example_config

        config = _example_config("example-sft", work, SMOLLM2_STEPS)
        config["seed"] = 1000 + seed
        paths = None
    else:
        rng = random.Random(f"lds/{kind}/{seed}")
        make = _cls_rows if kind == "cls" else _sft_rows
        paths = {split: write_jsonl(work / "data" / f"{split}.jsonl", make(n, rng, 0.0, split))
                 for split, n in SIZES[kind].items()}
        config = _config(task, model, paths, 1000 + seed, 4)
    (work / "train.yaml").write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    parent = train_run(work / "train.yaml", work / "cache", work / "runs")
    train_seconds = time.perf_counter() - started
    stage_seconds = float(json.loads((parent / "run.json").read_text())["stages"]["train"]["seconds"])
    started = time.perf_counter()
    plan = row_attribution.plan_row_attribution(parent, cache_root=work / "cache", checkpoints=4)
    merged = row_attribution.attribute_rows(plan, work / "scores")
    scoring_seconds = time.perf_counter() - started
    table = pd.read_parquet(Path(merged["dir"]) / merged["file"])
    scores = {m: table[f"score_{m}"].to_numpy() for m in plan.methods}
    method_seconds = {}
    if kind != "smollm2":  # there each method alone and the exact inner products would cost a CPU session's hour:
        method_seconds = _exact_and_alone(parent, plan, work, scores)  # bench/results/rows-smollm2.json times them
    if paths is None:  # a stored dataset version: its train rows in order, the arms derived versions of it
        from verifily_train.attribution.derive import train_lines
        from verifily_train.attribution.derive_rows import derive_without_rows
        from verifily_train.dataset.store import load_for_config

        dv = load_for_config(config["dataset_version"], None, task)
        lines = train_lines(dv)
    else:
        lines = [line for line in Path(paths["train"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    hashes = [row_hash_of(line) for line in lines]
    order = {h: i for i, h in enumerate(table["row_hash"])}
    scores = {m: v[[order[h] for h in hashes]] for m, v in scores.items()}  # the scores in train-line order
    # half of the distinct rows: a row repeated in the split is kept or dropped with all its copies (a derived
    # version drops rows by row hash), each copy adding its score to the prediction
    distinct = list(dict.fromkeys(hashes))
    index = {h: i for i, h in enumerate(distinct)}
    masks = half_subsets(len(distinct), subsets, seed)[:, [index[h] for h in hashes]]
    measured = []
    begun = time.perf_counter()
    for k, mask in enumerate(masks):
        arm = work / f"subset-{k}"
        if paths is None:
            dropped = {h for h, keep in zip(hashes, mask) if not keep}
            derived = derive_without_rows(dv, dropped, {"by": "lds", "subset": k, "seed": seed}, f"lds{k}")
            arm_config = dict(config, dataset_version=derived["ref"])
        else:
            kept = write_jsonl(arm / "train.jsonl", [json.loads(line) for line, keep in zip(lines, mask) if keep])
            arm_config = dict(config, data_paths=dict(config["data_paths"], train=str(kept)))
        arm.mkdir(parents=True, exist_ok=True)
        (arm / "train.yaml").write_text(yaml.safe_dump(arm_config))
        run = train_run(arm / "train.yaml", work / "cache", work / "runs")
        measured.append(float(per_example(run, task)["loss"].mean()))
        print(f"[{time.perf_counter() - begun:.0f}s] subset {k + 1}/{subsets}: target loss {measured[-1]:.4f}", flush=True)
    methods, predicted = {}, {}
    for method, score in scores.items():
        base = method.split("@")[0]
        predicted[method] = predicted_effect(score, masks).tolist()
        alone = method_seconds.get(base)
        methods[method] = dict(lds(predicted[method], measured), family=row_attribution.FAMILIES[base],
                               seconds_alone=None if alone is None else round(alone, 2),
                               cost_in_train_stages=None if alone is None else round(alone / stage_seconds, 3))
        if method != "tracin":
            methods[method]["minus_tracin"] = lds_difference(predicted[method], predicted["tracin"], measured)
    return {"kind": kind, "seed": seed, "subsets": subsets, "train_rows": len(lines), "distinct_train_rows": len(distinct), "target": "test: mean per-row loss",
            "methods": methods, "measured_loss": measured, "predicted": predicted,
            "parent_test_loss": float(per_example(parent, task)["loss"].mean()), "train_seconds": round(train_seconds, 2),
            "train_stage_seconds": round(stage_seconds, 2), "scoring_seconds": round(scoring_seconds, 2),
            "subsets_seconds": round(time.perf_counter() - begun, 1),
            "cost_in_train_runs": {"every_method_together": round(scoring_seconds / stage_seconds, 3),
                                   "lds_itself": subsets + 1}}


def _mean_cost(parents: List[dict], method: str) -> str:
    costs = [p["methods"][method]["cost_in_train_stages"] for p in parents]
    return "-" if None in costs else f"{sum(costs) / len(costs):.2f}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("cls", "sft", "smollm2"), default="cls",
                        help="smollm2: the shipped SFT example on the embedded SmolLM2-135M-Instruct (example-sft)")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--parents", type=int, default=1, help="dataset draws (seeds), each with its own subsets")
    parser.add_argument("--root", default=None)
    args = parser.parse_args(argv)
    import tempfile

    from bench.row_attribution import build_models

    import torch

    from bench.common import quiet_libraries

    if args.kind != "smollm2":  # SmolLM2 runs alone, on every core
        torch.set_num_threads(1)  # the machine is shared: one core for training and scoring alike
    quiet_libraries()
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = Path(args.root or tempfile.mkdtemp(prefix="verifily-lds-"))
    models = {"smollm2": None} if args.kind == "smollm2" else build_models(root / "models")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"row-lds-{args.kind}.json"
    parents = []
    for seed in range(args.parents):
        parents.append(run_lds(args.kind, models[args.kind], root, args.subsets, seed))
        summary = {m: pooled(parents, m) for m in parents[0]["methods"]}
        out.write_text(json.dumps({"kind": args.kind, "subsets": args.subsets, "parents": len(parents),
                                   "summary": summary, "runs": parents}, indent=1))
    print(f"| method | family | LDS, mean of {len(parents)} parents x {args.subsets} half-subsets [95% bootstrap] "
          "| minus tracin [95% paired bootstrap] | per parent | cost (train stages) |")
    print("|---|---|---|---|---|---|")
    for method, entry in summary.items():
        first = parents[0]["methods"][method]
        print(f"| {method} | {first['family']} | {entry['lds']:+.3f} [{entry['ci95'][0]:+.3f}, {entry['ci95'][1]:+.3f}] "
              f"| {entry['minus_tracin']:+.3f} [{entry['minus_tracin_ci95'][0]:+.3f}, {entry['minus_tracin_ci95'][1]:+.3f}] "
              f"| {', '.join(f'{x:+.2f}' for x in entry['per_parent'])} "
              f"| {_mean_cost(parents, method)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
