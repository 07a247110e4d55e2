"""Row scores on four kinds of planted rows: two hard to fit, two harmful but easy to fit.

``python -m bench.row_plants [--trials 8]``. Each trial draws a new dataset and training seed, plants one kind
of row in 10% of the train rows (the same rows, unplanted, are the trial's clean twin), trains the planted
Run and its clean twin with the pipeline's stage functions in-process, and scores the planted Run's rows
with every method (``rows.attribute_rows``: 4 checkpoints, 1024 dimensions, target: the test split).

Plants (``cls``: the tiny BERT classification fixture; ``sft``: the tiny Llama SFT fixture; sizes, training
and models of ``bench.row_attribution``):
- ``labels`` (cls) / ``swap`` (sft): a random other label / the outputs of two rows swapped: hard to fit.
- ``contam``: a planted train row is a near-duplicate of a test row (cls: its text with one word dropped or
  repeated, the same label; sft: its instruction without its final full stop, the same input and output), each from a
  different test row: easy to fit, and it *lowers* the test loss (a leak, not an error).
- ``shortcut``: a token the rows never contain (cls ``sheep``, sft ``movie``) added to the planted rows, whose
  label is then always ``positive`` with label-free filler words (cls), or whose output is always ``quiet``
  (sft): the token predicts the label in those train rows. In test the token is added to 30% of the rows with
  their own labels and outputs, so a model that learnt the shortcut is wrong there: easy to fit, harmful.
Per plant and method: AUROC of the score for "planted" (higher score = more harmful; below 0.5 the plants
rank at the *helpful* end), the share of the planted rows among the 10% of rows ranked most harmful, and
among the 10% ranked most helpful (lowest scores); each a mean over trials with a Student t 95% interval
(the trial is the unit). ``test_loss_delta``: the planted Run's test loss minus its clean twin's, the
plant's measured effect on the target (t interval over trials).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from bench.row_attribution import LABELS, SIZES, _cls_rows, _config, _interval, _sft_rows, build_models

RESULTS = Path(__file__).resolve().parent / "results"
PLANTS = ("cls-labels", "cls-contam", "cls-shortcut", "sft-swap", "sft-contam", "sft-shortcut")
SHARE = 0.1  # of the train rows planted
TEST_SHORTCUT_SHARE = 0.3  # of the test rows carrying the shortcut token (with their own labels)
SHORTCUT_TOKEN = {"cls": "sheep", "sft": "movie"}  # in the fixture tokenizer's vocabulary, never in these rows
SHORTCUT_LABEL, SHORTCUT_OUTPUT = "positive", "quiet"


def _near_duplicate(row: dict, family: str, rng: random.Random) -> dict:
    if family == "cls":
        words = row["text"].split()
        i = rng.randrange(len(words))
        words = words[:i] + words[i + 1:] if len(words) > 3 else words[:i + 1] + words[i:]  # drop or repeat one
        return {"text": " ".join(words), "label": row["label"]}
    instruction = row["instruction"]
    reworded = instruction[:-1] if instruction.endswith(".") else instruction + " ."  # one token fewer or more
    return {"instruction": reworded, "input": row["input"], "output": row["output"]}


def plant_rows(plant: str, trial: int) -> Dict[str, List[dict]]:
    """(planted, clean) rows per split for one trial: the clean twin has the unplanted rows in the same places."""
    from verifily_train.fixtures.data import SUBJECTS

    family, kind = plant.split("-")
    rng = random.Random(f"plants/{plant}/{trial}")
    make = _cls_rows if family == "cls" else _sft_rows
    clean = {split: make(n, rng, 0.0, split) for split, n in SIZES[family].items()}
    planted = {split: [dict(r, tags=dict(r["tags"])) for r in rows] for split, rows in clean.items()}
    train = planted["train"]
    chosen = rng.sample(range(len(train)), round(SHARE * len(train)))
    if kind == "labels":  # a random other label (as bench.row_attribution)
        for i in chosen:
            train[i]["label"] = rng.choice([x for x in LABELS if x != train[i]["label"]])
            train[i]["tags"]["planted"] = "yes"
    elif kind == "swap":  # outputs swapped in pairs of rows whose answers differ (as bench.row_attribution)
        free = list(chosen)
        while len(free) >= 2:
            i = free.pop()
            j = next((j for j in free if train[j]["output"] != train[i]["output"]), None)
            if j is None:
                continue
            free.remove(j)
            train[i]["output"], train[j]["output"] = train[j]["output"], train[i]["output"]
            train[i]["tags"]["planted"] = train[j]["tags"]["planted"] = "yes"
    elif kind == "contam":
        sources = rng.sample(range(len(planted["test"])), len(chosen))
        for i, j in zip(chosen, sources):
            train[i] = dict(_near_duplicate(planted["test"][j], family, rng), id=train[i]["id"],
                            tags=dict(train[i]["tags"], planted="yes"))
    elif kind == "shortcut":
        token = SHORTCUT_TOKEN[family]
        for i in chosen:
            row = train[i]
            if family == "cls":
                filler = [rng.choice(SUBJECTS) for _ in range(rng.randint(2, 4))]
                filler.insert(rng.randrange(len(filler) + 1), token)
                train[i] = dict(row, text=" ".join(filler), label=SHORTCUT_LABEL, tags=dict(row["tags"], planted="yes"))
            else:
                train[i] = dict(row, input=f"{row['input']} {token}".strip(), output=SHORTCUT_OUTPUT,
                                tags=dict(row["tags"], planted="yes"))
        test = planted["test"]
        for j in rng.sample(range(len(test)), round(TEST_SHORTCUT_SHARE * len(test))):
            if family == "cls":
                words = test[j]["text"].split()
                words.insert(rng.randrange(len(words) + 1), token)
                test[j] = dict(test[j], text=" ".join(words))
            else:
                test[j] = dict(test[j], input=f"{test[j]['input']} {token}".strip())
        clean["test"] = test  # both Runs are measured on the same test rows
    else:
        raise ValueError(f"unknown plant {plant!r}")
    return {"planted": planted, "clean": clean}


def run_trial(plant: str, trial: int, model: str, root: str) -> dict:
    import numpy as np
    import pandas as pd
    import yaml
    from sklearn.metrics import roc_auc_score

    from verifily_train.attribution import rows as row_attribution
    from verifily_train.attribution.analysis import per_example
    from verifily_train.fixtures.data import write_jsonl
    from verifily_train.fixtures.runs import train_run

    family = plant.split("-")[0]
    task = "classification" if family == "cls" else "sft"
    work = Path(root) / f"{plant}-{trial}"
    shutil.rmtree(work, ignore_errors=True)
    os.environ["VERIFILY_HOME"] = str(work / "home")
    data = plant_rows(plant, trial)
    runs, losses = {}, {}
    for arm in ("planted", "clean"):
        paths = {split: write_jsonl(work / arm / "data" / f"{split}.jsonl", rows) for split, rows in data[arm].items()}
        (work / arm / "train.yaml").write_text(yaml.safe_dump(_config(task, Path(model), paths, 1000 + trial, 4)))
        runs[arm] = train_run(work / arm / "train.yaml", work / "cache", work / "runs")
        losses[arm] = float(per_example(runs[arm], task)["loss"].mean())
    started = time.perf_counter()
    plan = row_attribution.plan_row_attribution(runs["planted"], cache_root=work / "cache", checkpoints=4, seed=trial)
    merged = row_attribution.attribute_rows(plan, work / "scores")
    seconds = time.perf_counter() - started
    table = pd.read_parquet(Path(merged["dir"]) / merged["file"])
    planted = np.array([json.loads(t)["planted"] == "yes" for t in table["tags"]])
    top = max(1, round(0.1 * len(table)))
    methods = {}
    for method in plan.methods:
        score = table[f"score_{method}"].to_numpy()
        order = np.argsort(-score, kind="stable")
        harmful, helpful = order[:top], order[::-1][:top]
        methods[method] = {"auroc": float(roc_auc_score(planted, score)),
                           "top10_recall": float(planted[harmful].sum() / planted.sum()),
                           "bottom10_recall": float(planted[helpful].sum() / planted.sum())}
    record = json.loads((runs["planted"] / "run.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return {"plant": plant, "trial": trial, "rows": int(len(table)), "planted": int(planted.sum()), "methods": methods,
            "test_loss": losses, "test_loss_delta": losses["planted"] - losses["clean"], "scoring_seconds": seconds,
            "test_metrics": {k: v for k, v in record["metrics"].items() if k in ("accuracy", "loss")}}


def summarize(trials: List[dict]) -> dict:
    out: Dict[str, dict] = {}
    for plant in [p for p in PLANTS if any(t["plant"] == p for t in trials)]:
        mine = [t for t in trials if t["plant"] == plant]
        out[plant] = {"trials": len(mine),
                      "test_loss_delta": _interval([t["test_loss_delta"] for t in mine]),
                      "methods": {m: {key: _interval([t["methods"][m][key] for t in mine], (0.0, 1.0))
                                      for key in ("auroc", "top10_recall", "bottom10_recall")}
                                  for m in mine[0]["methods"]}}
    return out


def render(summary: dict) -> str:
    def cell(r, pct=False):
        low, high = r["ci95"]
        f = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.2f}")
        return f"{f(r['mean'])} [{f(low)}, {f(high)}]" if low is not None else f(r["mean"])

    lines = ["| plant | test loss, planted - clean | method | AUROC (harmful end) | planted in top 10% | "
             "planted in bottom 10% (most helpful) |", "|---|---|---|---|---|---|"]
    for plant, entry in summary.items():
        delta = entry["test_loss_delta"]
        d = f"{delta['mean']:+.3f} [{delta['ci95'][0]:+.3f}, {delta['ci95'][1]:+.3f}]" if delta["ci95"][0] is not None else ""
        for method, r in entry["methods"].items():
            lines.append(f"| {plant} | {d} | {method} | {cell(r['auroc'])} | {cell(r['top10_recall'], True)} | "
                         f"{cell(r['bottom10_recall'], True)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.row_plants", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--plants", default=",".join(PLANTS))
    parser.add_argument("--out", default=str(RESULTS / "row-plants.json"))
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    from bench.common import finished_trials, quiet_libraries

    torch.set_num_threads(1)  # the machine is shared
    quiet_libraries()
    root = Path(tempfile.mkdtemp(prefix="verifily-bench-plants-"))
    models = build_models(root / "models")
    out = Path(args.out)
    settings = {"share": SHARE, "test_shortcut_share": TEST_SHORTCUT_SHARE, "sizes": SIZES, "checkpoints": 4,
                "projection_dim": 1024, "target": "test"}
    done: List[dict] = finished_trials(out, settings)  # resume: the finished trials of the same settings
    have = {(t["plant"], t["trial"]) for t in done}
    started = time.time()
    for trial in range(args.trials):
        for plant in args.plants.split(","):
            if (plant, trial) in have:
                continue
            result = run_trial(plant, trial, str(models[plant.split("-")[0]]), str(root))
            done.append(result)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"settings": settings, "summary": summarize(done), "trials": done}, indent=1))
            print(f"[{time.time() - started:.0f}s] {plant} #{trial}: test loss {result['test_loss_delta']:+.3f} vs clean; "
                  + ", ".join(f"{m} {r['auroc']:.2f}/{r['top10_recall']:.0%}/{r['bottom10_recall']:.0%}"
                              for m, r in result["methods"].items()), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    print(render(summarize(done)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
