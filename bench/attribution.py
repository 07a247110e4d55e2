"""Calibration of `verifily attribute`'s verdicts: placebo false-positive rate and power, with intervals.

``python -m bench.attribution [--trials 20] [--seeds 5] [--workers 2]`` (also ``python -m bench --only attribution``).
Each trial is a real attribution experiment on the tiny BERT fixture (classification, 30 optimizer steps,
the settings of tests/test_causal_attribution.py): datasets stored and derived with the library's own
functions, every arm trained and evaluated by the pipeline's stage functions in-process (no Prefect:
the statistics are the subject here, not the orchestration), and judged by ``attribution.analyze``.

- ``placebo-coin``: clean rows, each carrying a coin-flip tag ``coin: heads|tails``; both values are
  attributed (Holm over 2). No value's rows differ in kind: every hurts/helps is a false positive.
- ``placebo-shuffle``: zero rows removed, the order reshuffled (``training.data_order_seed``), against
  the full arm as its size-matched control: any verdict is a false positive.
- ``power-<share>``: the ``scraped`` source (``share`` of train rows) carries random labels; ``scraped``
  and ``synthetic`` are attributed (Holm over 2); the trial counts whether ``scraped`` is called hurts
  (power) and whether ``synthetic`` is called hurts (wrong). ``synthetic`` called helps is right: beside
  a noisy source, clean rows are better than average rows, which is the question the verdict answers.
Rates come with exact Clopper-Pearson 95% intervals. Results: bench/results/attribution.json.
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 30
TEST_ROWS = int(os.environ.get("VERIFILY_BENCH_TEST_ROWS", "90"))
KINDS = ("placebo-coin", "placebo-shuffle", "power-0.35", "power-0.15")


def _config(model: Path, ref: str, seed: int, extra: dict) -> dict:
    training = {"num_epochs": 50, "max_steps": STEPS, "batch_size": 16, "gradient_accumulation_steps": 1,
                "learning_rate": 3e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0, "max_seq_length": 32,
                "save_steps": 1000, "eval_steps": 1000}
    training.update(extra)
    return {"task": "classification", "base_model": str(model), "dataset_version": ref, "seed": seed,
            "training": training, "lora": {"enabled": False},
            "eval": {"bootstrap_samples": 0, "hard_examples": 5, "slice_by_tags": []}}


def train_and_score(model: Path, ref: str, seed: int, work: Path, extra: dict | None = None):
    """One arm at one seed through the pipeline's stages; the per-example table attribution reads."""
    import pandas as pd
    import yaml

    from verifily_train.pipeline import runner as stages

    from verifily_train.pipeline.fingerprint import fingerprint_stage
    from verifily_train.attribution import per_example_frame
    from verifily_train.config import load_config

    folder = Path(tempfile.mkdtemp(dir=work))
    try:
        (folder / "train.yaml").write_text(yaml.safe_dump(_config(model, ref, seed, extra or {})))
        cfg = load_config(str(folder / "train.yaml"))
        fp = fingerprint_stage(cfg, work / "cache")
        outs = {name: folder / name for name in ("tokenize", "train", "evaluate")}
        for path in outs.values():
            path.mkdir()
        tokenized = dict(stages.run_uncached("tokenize", cfg, fp, outs["tokenize"], folder), dir=str(outs["tokenize"]))
        trained = dict(stages.run_uncached("train", cfg, fp, outs["train"], folder, tokenize=tokenized), dir=str(outs["train"]))
        evaluated = stages.run_uncached("evaluate", cfg, fp, outs["evaluate"], folder, tokenize=tokenized, train=trained)
        return per_example_frame(pd.read_parquet(outs["evaluate"] / evaluated["predictions"]), "classification")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _rows(n: int, rng: random.Random, noisy_share: float, noisy_labels: bool) -> List[dict]:
    from verifily_train.fixtures.data import NEGATIVE, NEUTRAL, POSITIVE

    rows = []
    for _ in range(n):
        source = "scraped" if rng.random() < noisy_share else rng.choice(["human", "synthetic"])
        label = rng.choice(["positive", "negative", "neutral"])
        words = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label]
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))
        if noisy_labels and source == "scraped":
            label = rng.choice(["positive", "negative", "neutral"])
        rows.append({"text": text, "label": label,
                     "tags": {"source": source, "coin": rng.choice(["heads", "tails"])}})
    return rows


def _store(home: Path, name: str, rng: random.Random, share: float):
    from verifily_train.dataset.store import create_version
    from verifily_train.fixtures.data import write_jsonl

    folder = home.parent / f"data-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {split: write_jsonl(folder / f"{split}.jsonl", _rows(n, rng, share, split == "train"))
             for split, n in (("train", 120), ("val", 12), ("test", TEST_ROWS))}
    return create_version(f"ds_{name}", "v1", "classification", str(paths["train"]), str(paths["val"]),
                          str(paths["test"]), home=home)


def run_trial(kind: str, trial: int, seeds: int, model: str, root: str) -> dict:
    """One calibration trial; returns the verdicts and the per-value seed statistics."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(1)
    from verifily_train import attribution

    work = Path(root) / f"{kind}-{trial}"
    home = work / "home"
    os.environ["VERIFILY_HOME"] = str(home)
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{kind}/{trial}")
    share = float(kind.split("-")[1]) if kind.startswith("power") else 0.0
    dv = _store(home, f"t{trial}", rng, share)
    base_seed = 1000 * (trial + 1)
    model_path = Path(model)

    def arm(ref: str, extra_for_seed=None) -> list:
        return [train_and_score(model_path, ref, base_seed + s, work,
                                extra_for_seed(base_seed + s) if extra_for_seed else None) for s in range(seeds)]

    tables = {attribution.FULL: arm(dv.ref)}
    plan: Dict[str, dict] = {}
    if kind == "placebo-shuffle":
        tables["reshuffled"] = arm(dv.ref, lambda s: {"data_order_seed": s + 7919})
        tables[attribution.control_arm(0)] = tables[attribution.FULL]  # zero rows removed: the full arm itself
        plan["reshuffled"] = {"removed_rows": 0, "kept_rows": 120, "derived_dataset": dv.ref,
                              "control": attribution.control_arm(0)}
        by = "coin"
    else:
        by = "coin" if kind == "placebo-coin" else "source"
        values = ["heads", "tails"] if kind == "placebo-coin" else ["scraped", "synthetic"]
        for value in values:
            derived = attribution.derive_without(dv, by, value, home=home)
            control = attribution.control_arm(derived["removed_rows"])
            tables[value] = arm(derived["ref"])
            if control not in tables:
                refs = [attribution.derive_random(dv, derived["removed_rows"], base_seed + s, home=home)["ref"]
                        for s in range(seeds)]
                tables[control] = [train_and_score(model_path, refs[s], base_seed + s, work) for s in range(seeds)]
            plan[value] = {"removed_rows": derived["removed_rows"], "kept_rows": derived["kept_rows"],
                           "derived_dataset": derived["ref"], "control": control}
    result = attribution.analyze("classification", by, tables, plan, bootstrap_samples=0)
    shutil.rmtree(work, ignore_errors=True)
    out = {"kind": kind, "trial": trial, "values": {}}
    for value, entry in result["values"].items():
        cell = entry["slices"][entry["verdict_slice"]]["loss"]
        out["values"][value] = {"verdict": entry["verdict"], "p_adjusted": entry["p_adjusted"], "p": cell["p"],
                                "effect": cell["effect"], "mde": cell["mde"], "seed_sd": cell["seed_sd"],
                                "removal_effect": cell["removal_effect"],
                                "random_removal_effect": cell["random_removal_effect"],
                                "removed_rows": entry["removed_rows"]}
    return out


def summarize(trials: List[dict]) -> dict:
    """False-positive rates and power with exact intervals, per kind."""
    from verifily_train.attribution.stats import binomial_interval

    out = {}
    for kind in sorted({t["kind"] for t in trials}):
        mine = [t for t in trials if t["kind"] == kind]
        called = lambda t, v: t["values"][v]["verdict"] in ("hurts", "helps")  # noqa: E731
        if kind.startswith("power"):
            hits = sum(t["values"]["scraped"]["verdict"] == "hurts" for t in mine)
            # beside a noisy source a clean one IS better than average rows: "helps" is a right answer, "hurts" wrong
            wrong = sum(t["values"]["synthetic"]["verdict"] == "hurts" for t in mine)
            better = sum(t["values"]["synthetic"]["verdict"] == "helps" for t in mine)
            out[kind] = {"power": binomial_interval(hits, len(mine)),
                         "clean_value_called_hurts": binomial_interval(wrong, len(mine)),
                         "clean_value_called_helps": binomial_interval(better, len(mine)),
                         "median_effect": _median([t["values"]["scraped"]["effect"] for t in mine]),
                         "median_mde": _median([t["values"]["scraped"]["mde"] for t in mine])}
        else:
            tests = [(t, v) for t in mine for v in t["values"]]
            out[kind] = {"false_positive_per_value": binomial_interval(sum(called(t, v) for t, v in tests), len(tests)),
                         "false_positive_any_value": binomial_interval(
                             sum(any(called(t, v) for v in t["values"]) for t in mine), len(mine)),
                         "median_mde": _median([t["values"][v]["mde"] for t, v in tests]),
                         "mean_removal_effect": sum(t["values"][v]["removal_effect"] for t, v in tests) / len(tests),
                         "mean_effect_vs_random": sum(t["values"][v]["effect"] for t, v in tests) / len(tests)}
    return out


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def render(summary: dict) -> str:
    def rate(r):
        return f"{r['k']}/{r['n']} = {r['rate']:.0%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]"

    lines = ["| experiment | measured (exact 95% CI) |", "|---|---|"]
    for kind, s in summary.items():
        if kind.startswith("power"):
            lines.append(f"| {kind}: noisy source called hurts (power) | {rate(s['power'])} |")
            lines.append(f"| {kind}: clean source called hurts (wrong) | {rate(s['clean_value_called_hurts'])} |")
            lines.append(f"| {kind}: clean source called helps (better than average rows) | "
                         f"{rate(s['clean_value_called_helps'])} |")
        else:
            lines.append(f"| {kind}: false hurts/helps per value | {rate(s['false_positive_per_value'])} |")
            lines.append(f"| {kind}: trials with any false call | {rate(s['false_positive_any_value'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attribution", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per experiment (default 20)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm (default 5, the CLI's default)")
    parser.add_argument("--workers", type=int, default=2, help="trials in parallel, one torch thread each")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated among {', '.join(KINDS)}")
    parser.add_argument("--out", default=str(RESULTS / "attribution.json"))
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from verifily_train.fixtures.models import build_all

    root = Path(tempfile.mkdtemp(prefix="verifily-bench-attr-"))
    model = build_all(root / "models")["bert"]
    out = Path(args.out)
    done: List[dict] = []
    if out.is_file():  # resume: keep finished trials of the same settings
        previous = json.loads(out.read_text())
        if previous.get("settings", {}).get("seeds") == args.seeds and previous.get("settings", {}).get("steps") == STEPS:
            done = previous.get("trials", [])
    have = {(t["kind"], t["trial"]) for t in done}
    todo = [(k, i) for i in range(args.trials) for k in args.kinds.split(",") if (k, i) not in have]
    started = time.time()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_trial, k, i, args.seeds, str(model), str(root)) for k, i in todo]
        for future in futures:
            done.append(future.result())
            summary = summarize(done)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"settings": {"seeds": args.seeds, "steps": STEPS, "model": "tiny bert fixture",
                                                    "train_rows": 120, "test_rows": 90, "alpha": 0.05,
                                                    "correction": "holm"},
                                       "summary": summary, "trials": done}, indent=1))
            print(f"[{time.time() - started:.0f}s] {done[-1]['kind']} #{done[-1]['trial']}: "
                  + ", ".join(f"{v}={e['verdict']} (p={e['p_adjusted']})" for v, e in done[-1]["values"].items()),
                  flush=True)
    shutil.rmtree(root, ignore_errors=True)
    record = json.loads(out.read_text()) if out.is_file() else {"trials": done}
    record["summary"] = summarize(done)  # re-summarized by this code, also when every trial was already done
    out.write_text(json.dumps(record, indent=1))
    print(render(record["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
