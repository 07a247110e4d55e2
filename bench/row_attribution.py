"""Row-level attribution on planted errors: does each method find the rows we broke, and at what cost?

``python -m bench.row_attribution [--trials 5]`` (also ``python -m bench --only rows``). Each trial draws a new
dataset and training seed, plants errors in a share of the train rows, trains a real Run (the pipeline's
stage functions in-process, ``verifily_train.fixtures.runs``) and runs the library's row attribution on it
(plan -> target gradients -> one shard -> merge), exactly as ``verifily attribute --rows`` does.

- ``cls-<share>``: classification (tiny BERT fixture, LoRA + head), ``share`` of the train rows relabelled
  to another label at random. Planted rows carry ``source: scraped``, as do 10% of the clean rows: the
  per-tag-value check asks whether the sum of TracIn scores calls ``scraped`` harmful (positive).
- ``sft-<share>``: SFT (tiny Llama pre-trained on the fixture corpus, LoRA), the outputs of ``share`` of
  the train rows swapped in pairs (rows with different answers).
Per method: AUROC of the score for "planted", and the share of planted rows among the top 10% of rows by
score, each as a mean over trials with a Student t 95% interval (the trial is the unit); the cost ratio is
the whole attribution's wall time over the Run's own train stage time (same process, model and data).
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

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("cls-0.1", "cls-0.2", "cls-0.3", "sft-0.1", "sft-0.2")
SIZES = {"cls": {"train": 200, "val": 20, "test": 100}, "sft": {"train": 160, "val": 16, "test": 60}}
# the tiny BERT is random-initialised: LoRA on it needs a high rate and 8 epochs to learn the task (test
# accuracy about 0.9; at 3 epochs and 1e-2 it stays near chance and no method finds anything)
TRAINING = {"cls": {"num_epochs": 8, "batch_size": 16, "learning_rate": 5e-2},
            "sft": {"num_epochs": 3, "batch_size": 16, "learning_rate": 5e-3}}
LABELS = ("positive", "negative", "neutral")


def _cls_rows(n: int, rng: random.Random, share: float, split: str) -> List[dict]:
    from verifily_train.fixtures.data import NEGATIVE, NEUTRAL, POSITIVE

    rows, planted = [], set(rng.sample(range(n), round(share * n))) if split == "train" else set()
    for i in range(n):
        label = rng.choice(LABELS)
        words = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label]
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))
        source = "scraped" if i in planted or rng.random() < 0.1 else rng.choice(["human", "synthetic"])
        if i in planted:
            label = rng.choice([x for x in LABELS if x != label])
        rows.append({"id": f"{split}-{i}", "text": text, "label": label,
                     "tags": {"source": source, "planted": "yes" if i in planted else "no"}})
    return rows


def _sft_rows(n: int, rng: random.Random, share: float, split: str) -> List[dict]:
    from verifily_train.fixtures.data import make_rows

    pool = [r for r in make_rows("sft", 3 * n, rng.randrange(1 << 30)) if r["tags"]["source"] != "ai_contaminated"][:n]
    rows = [{"id": f"{split}-{i}", "instruction": r["instruction"], "input": r["input"], "output": r["output"],
             "tags": {"source": r["tags"]["source"], "planted": "no"}} for i, r in enumerate(pool)]
    if split == "train":
        want, order = round(share * n), list(range(n))
        rng.shuffle(order)
        chosen: List[int] = []
        for i in order:  # pair rows whose answers differ, so every swap is an error
            if len(chosen) >= want:
                break
            if i in chosen:
                continue
            partner = next((j for j in order if j not in chosen and j != i and rows[j]["output"] != rows[i]["output"]), None)
            if partner is not None:
                rows[i]["output"], rows[partner]["output"] = rows[partner]["output"], rows[i]["output"]
                chosen += [i, partner]
        for i in chosen:
            rows[i]["tags"] = dict(rows[i]["tags"], planted="yes")
    return rows


def _config(task: str, model: Path, paths: Dict[str, Path], seed: int, snapshots: int) -> dict:
    family = "cls" if task == "classification" else "sft"
    training = dict(TRAINING[family], gradient_accumulation_steps=1, lr_scheduler="linear", warmup_ratio=0.0,
                    max_seq_length=64, save_steps=10000, eval_steps=10000, attribution_snapshots=snapshots)
    return {"task": task, "base_model": str(model), "data_paths": {k: str(v) for k, v in paths.items()}, "seed": seed,
            "training": training, "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0},
            "compute": {"bf16": False},
            "eval": {"bootstrap_samples": 0, "hard_examples": 3, "slice_by_tags": [],
                     "metrics": ["loss"] if task == "sft" else None}, "runtime": {"progress": False}}


def run_trial(kind: str, trial: int, model: str, root: str, checkpoints: int = 4, projection_dim: int = 1024) -> dict:
    """One trial: plant errors, train a Run, attribute its rows; every method's quality and the cost ratio."""
    import numpy as np
    import pandas as pd
    import yaml
    from sklearn.metrics import roc_auc_score

    from verifily_train.attribution import rows as row_attribution
    from verifily_train.fixtures.data import write_jsonl
    from verifily_train.fixtures.runs import train_run

    family, share = kind.split("-")[0], float(kind.split("-")[1])
    task = "classification" if family == "cls" else "sft"
    work = Path(root) / f"{kind}-{trial}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["VERIFILY_HOME"] = str(work / "home")
    rng = random.Random(f"rows/{kind}/{trial}")
    make = _cls_rows if family == "cls" else _sft_rows
    paths = {split: write_jsonl(work / "data" / f"{split}.jsonl", make(n, rng, share, split))
             for split, n in SIZES[family].items()}
    (work / "train.yaml").write_text(yaml.safe_dump(_config(task, Path(model), paths, 1000 + trial, checkpoints)))
    run = train_run(work / "train.yaml", work / "cache", work / "runs")
    record = json.loads((run / "run.json").read_text())
    train_seconds = record["stages"]["train"]["seconds"]
    started = time.perf_counter()
    plan = row_attribution.plan_row_attribution(run, cache_root=work / "cache", checkpoints=checkpoints,
                                                projection_dim=projection_dim, seed=trial)
    target = row_attribution.target_gradients(plan, work / "target")
    shard = row_attribution.score_shard(plan, target, 0, 1, work / "shard", target_dir=work / "target")
    merged = row_attribution.merge_shards(plan, [shard], work / "merged", shard_dirs=[work / "shard"])
    attribution_seconds = time.perf_counter() - started
    started = time.perf_counter()  # the default method alone (what a call with --methods <default> costs)
    alone = row_attribution.plan_row_attribution(run, cache_root=work / "cache", checkpoints=checkpoints,
                                                 methods=[row_attribution.DEFAULT_METHOD])
    alone_target = row_attribution.target_gradients(alone, work / "alone-target")
    alone_shard = row_attribution.score_shard(alone, alone_target, 0, 1, work / "alone-shard",
                                              target_dir=work / "alone-target")
    row_attribution.merge_shards(alone, [alone_shard], work / "alone-merged", shard_dirs=[work / "alone-shard"])
    default_alone_seconds = time.perf_counter() - started
    table = pd.read_parquet(work / "merged" / merged["file"])
    planted = np.array([json.loads(t)["planted"] == "yes" for t in table["tags"]])
    top = max(1, round(0.1 * len(table)))
    methods = {}
    for method in plan.methods:
        score = table[f"score_{method}"].to_numpy()
        best = table[f"rank_{method}"].to_numpy() <= top
        methods[method] = {"auroc": float(roc_auc_score(planted, score)),
                           "top10_recall": float((best & planted).sum() / max(planted.sum(), 1)),
                           "top10_precision": float((best & planted).sum() / top)}
    tags = {}
    if family == "cls":
        for method in plan.methods:
            tags[method] = {e["value"]: {"sum": e["sum"], "mean": e["mean"], "rows": e["rows"]}
                            for e in row_attribution.summarize_by_tag(table, method, "source")}
    shutil.rmtree(work, ignore_errors=True)
    return {"kind": kind, "trial": trial, "rows": int(len(table)), "planted": int(planted.sum()), "methods": methods,
            "tag_sums": tags, "train_stage_seconds": train_seconds, "attribution_seconds": attribution_seconds,
            "cost_ratio": attribution_seconds / train_seconds, "default_alone_seconds": default_alone_seconds,
            "default_alone_cost_ratio": default_alone_seconds / train_seconds, "target_loss_final": target["target_loss"][-1],
            "steps": [s["step"] for s in plan.snapshots],
            "test_metrics": {k: v for k, v in record["metrics"].items() if k in ("accuracy", "loss", "train_loss")}, "gradients": shard["per_row_gradients"]}


def _interval(values: List[float], bounds=(None, None)) -> dict:
    """Mean with a Student t 95% interval over trials (clipped to ``bounds``: an AUROC stays in [0, 1])."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return {"mean": float(x.mean()), "ci95": [None, None], "n": int(len(x))}
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    low, high = float(x.mean() - half), float(x.mean() + half)
    low, high = max(low, bounds[0]) if bounds[0] is not None else low, min(high, bounds[1]) if bounds[1] is not None else high
    return {"mean": float(x.mean()), "ci95": [low, high], "n": int(len(x))}


def summarize(trials: List[dict]) -> dict:
    """Per experiment and method: AUROC and top-10% recall with intervals; cost ratios; the tag-sign check."""
    out: Dict[str, dict] = {}
    for kind in sorted({t["kind"] for t in trials}):
        mine = [t for t in trials if t["kind"] == kind]
        methods = {m: {"auroc": _interval([t["methods"][m]["auroc"] for t in mine], (0.0, 1.0)),
                       "top10_recall": _interval([t["methods"][m]["top10_recall"] for t in mine], (0.0, 1.0))}
                   for m in mine[0]["methods"]}
        entry = {"methods": methods, "cost_ratio": _interval([t["cost_ratio"] for t in mine]),
                 "default_alone_cost_ratio": _interval([t["default_alone_cost_ratio"] for t in mine]),
                 "train_stage_seconds": _interval([t["train_stage_seconds"] for t in mine]),
                 "attribution_seconds": _interval([t["attribution_seconds"] for t in mine])}
        if mine[0]["tag_sums"]:
            tracin = [t["tag_sums"]["tracin"] for t in mine]
            entry["scraped_mean_highest"] = {m: sum(max(t["tag_sums"][m], key=lambda k: t["tag_sums"][m][k]["mean"])
                                                    == "scraped" for t in mine) for m in mine[0]["tag_sums"]}
            entry["tag_sign"] = {"scraped_sum_positive": sum(s["scraped"]["sum"] > 0 for s in tracin),
                                 "clean_sums_negative": sum(all(v["sum"] < 0 for k, v in s.items() if k != "scraped")
                                                            for s in tracin),
                                 "scraped_mean_highest": sum(max(s, key=lambda k: s[k]["mean"]) == "scraped"
                                                             for s in tracin),
                                 "trials": len(tracin)}
        out[kind] = entry
    out["_choice"] = choose_default(trials)
    return out


def choose_default(trials: List[dict]) -> dict:
    """The default: the method with the highest mean AUROC over the experiments, among those every task has;
    with each other method's paired AUROC difference (trial by trial) and its t interval."""
    kinds = sorted({t["kind"] for t in trials})
    common = [m for m in trials[0]["methods"] if all(m in t["methods"] for t in trials)]
    mean_auroc = {}
    for method in {m for t in trials for m in t["methods"]}:
        per_kind = [_interval([t["methods"][method]["auroc"] for t in trials if t["kind"] == k])["mean"]
                    for k in kinds if any(method in t["methods"] for t in trials if t["kind"] == k)]
        mean_auroc[method] = sum(per_kind) / len(per_kind)
    best = max(common, key=mean_auroc.get)
    paired = {m: _interval([t["methods"][best]["auroc"] - t["methods"][m]["auroc"] for t in trials if m in t["methods"]])
              for m in mean_auroc if m != best}
    return {"mean_auroc_over_experiments": dict(sorted(mean_auroc.items(), key=lambda kv: -kv[1])),
            "candidates": common, "best": best, "best_minus_other_auroc": paired}


def render(summary: dict) -> str:
    def cell(r, pct=False):
        low, high = r["ci95"]
        f = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.3f}")
        return f"{f(r['mean'])} [{f(low)}, {f(high)}]" if low is not None else f(r["mean"])

    lines = ["| experiment | method | AUROC (95% CI) | planted in top 10% (95% CI) |", "|---|---|---|---|"]
    for kind, entry in summary.items():
        if kind.startswith("_"):
            continue
        for method, r in entry["methods"].items():
            lines.append(f"| {kind} | {method} | {cell(r['auroc'])} | {cell(r['top10_recall'], True)} |")
    lines += ["", "| experiment | train stage (s) | whole row attribution (s) | cost ratio, every method (95% CI) | "
                  "cost ratio, the default alone | TracIn tag sums |", "|---|---|---|---|---|---|"]
    for kind, entry in summary.items():
        if kind.startswith("_"):
            continue
        sign = entry.get("tag_sign")
        signs = (f"scraped > 0 in {sign['scraped_sum_positive']}/{sign['trials']}, clean < 0 in "
                 f"{sign['clean_sums_negative']}/{sign['trials']}, scraped mean highest in "
                 f"{sign['scraped_mean_highest']}/{sign['trials']}") if sign else "-"
        lines.append(f"| {kind} | {entry['train_stage_seconds']['mean']:.2f} | {entry['attribution_seconds']['mean']:.2f}"
                     f" | {cell(entry['cost_ratio'])} | {cell(entry['default_alone_cost_ratio'])} | {signs} |")
    choice = summary.get("_choice", {})
    lines += ["", "mean AUROC over experiments: " + ", ".join(f"{m} {v:.3f}" for m, v in
                                                             choice.get("mean_auroc_over_experiments", {}).items())
              + f"; default (best of the methods every task has): {choice.get('best')}; its paired AUROC lead "
              "over each other method, per trial: " + ", ".join(
                  f"{m} {cell(r)}" for m, r in choice.get("best_minus_other_auroc", {}).items())]
    return "\n".join(lines)


def build_models(root: Path) -> Dict[str, Path]:
    """The tiny BERT fixture and a tiny Llama pre-trained on the fixture corpus (so SFT means something)."""
    from verifily_train.fixtures.models import build_model, pretrain_causal_lm

    return {"cls": build_model("bert", root / "tiny-bert"),
            "sft": pretrain_causal_lm(build_model("llama", root / "tiny-llama", hidden=48), steps=300)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.row_attribution", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="trials per experiment (default 5)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated among {', '.join(KINDS)}")
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--projection-dim", type=int, default=1024)
    parser.add_argument("--out", default=str(RESULTS / "rows.json"))
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(1)  # the machine is shared: one core, the same for training and attribution
    from bench.common import finished_trials, quiet_libraries

    quiet_libraries()
    root = Path(tempfile.mkdtemp(prefix="verifily-bench-rows-"))
    models = build_models(root / "models")
    out = Path(args.out)
    settings = {"checkpoints": args.checkpoints, "projection_dim": args.projection_dim, "sizes": SIZES,
                "training": TRAINING}
    done = finished_trials(out, settings)  # resume: the finished trials of the same settings
    have = {(t["kind"], t["trial"]) for t in done}
    started = time.time()
    for trial in range(args.trials):
        for kind in args.kinds.split(","):
            if (kind, trial) in have:
                continue
            result = run_trial(kind, trial, str(models[kind.split("-")[0]]), str(root), args.checkpoints,
                               args.projection_dim)
            done.append(result)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"settings": settings, "summary": summarize(done), "trials": done}, indent=1))
            print(f"[{time.time() - started:.0f}s] {kind} #{trial}: ratio {result['cost_ratio']:.2f}, "
                  f"{result['test_metrics']}, "
                  + ", ".join(f"{m} {r['auroc']:.3f}/{r['top10_recall']:.0%}" for m, r in result["methods"].items()),
                  flush=True)
    shutil.rmtree(root, ignore_errors=True)
    record = {"settings": settings, "summary": summarize(done), "trials": done}
    out.write_text(json.dumps(record, indent=1))
    print(render(record["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
