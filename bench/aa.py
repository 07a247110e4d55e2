"""Suite ``aa``, the placebo for ``verifily compare``: same data, same config, two seeds; how many cells get a star?

Nothing differs between the two runs of a pair but the seed, so every starred slice x metric cell is a
false discovery as far as the data is concerned. For each task (classification on the tiny BERT, SFT on
the tiny Llama from ``verifily_train/fixtures``) ``pairs`` seed pairs are trained with the pipeline's
stages by hand (no Prefect: the tokenized data is shared, as the cache would share it) and compared.

Reported per task: the mean fraction of starred cells (what ``compare`` stars: Benjamini–Hochberg at q
over swap tests whose null adds the between-slice spread) with a 95% bootstrap interval over pairs (the
pair is the unit: cells of one pair are correlated), the share of pairs with any star (exact
Clopper–Pearson interval), and, for contrast, two rules that ignore seed noise: BH over the row-level
swap tests alone, and the rule ``compare`` used before (a paired 95% interval that excludes zero).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from bench.common import markdown_table

TASKS = {
    # task: (fixture model kind, split sizes, config sections)
    "classification": ("bert", {"train": 160, "test": 200},
                       {"training": {"num_epochs": 4, "batch_size": 16, "gradient_accumulation_steps": 1,
                                     "learning_rate": 3e-3, "max_seq_length": 32},
                        "lora": {"enabled": False}}),
    # the Llama gets the fixture's short LM pre-training first: LoRA on a random base learns nothing to compare
    "sft": ("llama", {"train": 96, "test": 120},
            {"training": {"num_epochs": 2, "batch_size": 8, "gradient_accumulation_steps": 1,
                          "learning_rate": 5e-3, "max_seq_length": 64},
             "eval": {"max_new_tokens": 6, "baseline": False}}),
}
COMMON = {"eval": {"slice_by_tags": ["source", "difficulty", "length_bucket"], "hard_examples": 5,
                   "bootstrap_samples": 500},
          "training": {"save_steps": 10000, "eval_steps": 10000, "logging_steps": 50},
          "runtime": {"progress": False}}


def _config(work: Path, task: str, model: Path, splits: Dict[str, Path], seed: int) -> dict:
    _, _, sections = TASKS[task]
    cfg = {"task": task, "base_model": str(model), "seed": seed,
           "data_paths": {k: str(v) for k, v in splits.items()}}
    for source in (COMMON, sections):
        for key, value in source.items():
            cfg.setdefault(key, {}).update(value)
    return cfg


def _train_pairs(task: str, work: Path, pairs: int, log) -> List[tuple]:
    """Two runs per seed pair (seeds 2i+1, 2i+2), stages by hand, tokenized data shared."""
    from verifily_train.artifacts.record import RunStart, write_run
    from verifily_train.artifacts.run import new_run_id, utc_now
    from verifily_train.config import load_config
    from verifily_train.fixtures.data import write_splits
    from verifily_train.fixtures.models import build_model, pretrain_causal_lm
    from verifily_train.pipeline.fingerprint import fingerprint_stage
    from verifily_train.pipeline.runner import STAGES, run_uncached

    kind, sizes, _ = TASKS[task]
    model = build_model(kind, work / f"model-{kind}")
    if kind == "llama":
        pretrain_causal_lm(model, steps=150)
    splits = write_splits(work / f"data-{task}", task, sizes, seed=5)
    root, runs_dir = work / f"stages-{task}", work / f"runs-{task}"
    root.mkdir(parents=True, exist_ok=True)

    def run(name, folder, cfg, fp, done):
        out = root / folder
        out.mkdir(parents=True, exist_ok=True)
        return dict(run_uncached(name, cfg, fp, out, root / f"work-{folder}", **done), dir=str(out))

    first = load_config(_config(work, task, model, splits, 1))
    fp = fingerprint_stage(first, root / "cache")
    shared = {}
    for name in ("validate", "tokenize"):  # the seed is not in their keys
        shared[name] = run(name, name, first, fp, shared)
    out = []
    for i in range(pairs):
        pair = []
        for seed in (2 * i + 1, 2 * i + 2):
            start = RunStart(new_run_id(), utc_now(), time.time())
            cfg = load_config(_config(work, task, model, splits, seed))
            done = dict(shared)
            for stage in STAGES[2:]:  # baseline: skipped for this question (eval.baseline off)
                done[stage.name] = run(stage.name, f"{stage.name}-seed{seed}", cfg, fp, done)
            written = write_run(cfg, start, fp, done, runs_dir)
            pair.append(Path(written["path"]))
        log(f"  {task} pair {i + 1}/{pairs}: {pair[0].name} vs {pair[1].name}")
        out.append(tuple(pair))
    return out


def _cells(result: dict) -> List[dict]:
    """The tested cells (perplexity shares loss's test: counted once)."""
    cells = list(result["paired"].get("deltas", {}).values())
    cells += [d for values in result["slices"].values() for e in values.values() for d in e["deltas"].values()]
    return [c for c in cells if "same_test_as" not in c]


def _mean_interval(values: List[float], seed: int = 0, resamples: int = 10000) -> List[float]:
    """95% percentile bootstrap interval of the mean over pairs."""
    data = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    means = data[idx].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def _share_interval(k: int, n: int) -> List[float]:
    from scipy import stats

    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def summarize(task: str, comparisons: List[dict], q: float) -> dict:
    """Per-pair fractions of starred cells, BH and the unadjusted rule, with their intervals."""
    from verifily_train.evaluation.significance import benjamini_hochberg

    bh, raw, row_bh, any_bh, any_raw, any_row, cells = [], [], [], 0, 0, 0, []
    for result in comparisons:
        tested = [c for c in _cells(result) if c.get("p") is not None]
        starred = sum(1 for c in tested if c["significant"])
        unadjusted = sum(1 for c in tested if c.get("excludes_zero"))
        row_only = sum(1 for p in benjamini_hochberg([c["p_row"] for c in tested]) if p <= q)
        bh.append(starred / len(tested))
        raw.append(unadjusted / len(tested))
        row_bh.append(row_only / len(tested))
        any_bh += starred > 0
        any_raw += unadjusted > 0
        any_row += row_only > 0
        cells.append(len(tested))
    n = len(comparisons)
    return {
        "task": task, "pairs": n, "cells_per_pair": cells, "q": q,
        "bh_flagged_fraction_mean": float(np.mean(bh)), "bh_flagged_fraction_ci95": _mean_interval(bh),
        "bh_pairs_with_any_star": any_bh, "bh_any_star_share_ci95": _share_interval(any_bh, n),
        "unadjusted_flagged_fraction_mean": float(np.mean(raw)),
        "unadjusted_flagged_fraction_ci95": _mean_interval(raw),
        "unadjusted_pairs_with_any_flag": any_raw, "unadjusted_any_flag_share_ci95": _share_interval(any_raw, n),
        "row_noise_only_bh_flagged_fraction_mean": float(np.mean(row_bh)),
        "row_noise_only_bh_flagged_fraction_ci95": _mean_interval(row_bh), "row_noise_only_bh_pairs_with_any_star": any_row,
        "bh_flagged_fraction_per_pair": bh, "unadjusted_flagged_fraction_per_pair": raw,
        "within_q": float(np.mean(bh)) <= q,
    }


# the planted effect: on one slice B is made better than it was, on top of the seed noise of the pair
PLANTED_SLICE = ("source", "ai_contaminated")  # about 20% of the test rows


def plant_effect(task: str, run_b: Path, target: Path, seed: int) -> Path:
    """A copy of run B whose predictions are better on ``PLANTED_SLICE`` only: classification, half of B's
    wrong rows there predicted right; SFT, 15% less loss on each of those rows."""
    import shutil

    import pandas as pd

    from verifily_train.fsio import make_writable

    shutil.copytree(run_b, target)
    make_writable(target)
    frame = pd.read_parquet(target / "predictions.parquet")
    key, value = PLANTED_SLICE
    rows = (frame[f"tag.{key}"] == value).to_numpy()
    if task == "classification":
        fixed = rows & ~frame["correct"].to_numpy() & (np.random.default_rng(seed).random(len(frame)) < 0.5)
        frame.loc[fixed, "pred_id"] = frame.loc[fixed, "label_id"]
        frame["correct"] = frame["pred_id"] == frame["label_id"]
    else:
        frame.loc[rows, "loss_sum"] = frame.loc[rows, "loss_sum"] * 0.85
    frame.to_parquet(target / "predictions.parquet", index=False)
    return target


def planted_power(task: str, planted: List[dict], q: float) -> dict:
    """Share of pairs whose planted cell is starred, with and without the between-slice spread."""
    from verifily_train.evaluation.significance import benjamini_hochberg

    metric = "accuracy" if task == "classification" else "loss"
    key, value = PLANTED_SLICE
    found, found_row = 0, 0
    for result in planted:
        cell = result["slices"][key][value]["deltas"][metric]
        found += bool(cell["significant"])
        tested = [c for c in _cells(result) if c.get("p") is not None]
        adjusted = dict(zip(map(id, tested), benjamini_hochberg([c["p_row"] for c in tested])))
        found_row += adjusted[id(cell)] <= q
    n = len(planted)
    return {"slice": f"{key}={value}", "metric": metric, "pairs": n,
            "effect": "half of B's wrong rows there made right" if task == "classification" else "15% less loss",
            "starred": found, "power_ci95": _share_interval(found, n),
            "row_noise_only_starred": found_row, "row_noise_only_power_ci95": _share_interval(found_row, n)}


def run_aa(work: Path, pairs: int = 10, tasks=tuple(TASKS), log=print) -> dict:
    """Train ``pairs`` seed pairs per task, compare each pair, and summarize the stars."""
    from verifily_train.artifacts.compare import compare_runs
    from verifily_train.config.schema import EvalSection

    started = time.time()
    out = {"pairs": pairs, "q": EvalSection.fdr_q, "tasks": {}}
    for task in tasks:
        task_started = time.time()
        comparisons, planted = [], []
        for i, (run_a, run_b) in enumerate(_train_pairs(task, Path(work) / "aa", pairs, log)):
            for runs, into in (((run_a, run_b), comparisons),
                               ((run_a, plant_effect(task, run_b, Path(work) / "aa" / f"planted-{task}-{i}", i)), planted)):
                result = compare_runs(*runs, bootstrap_samples=1000)
                into.append({"paired": result["paired"], "slices": result["slices"], "fdr": result["fdr"]})
        summary = summarize(task, comparisons, EvalSection.fdr_q)
        summary["planted"] = planted_power(task, planted, EvalSection.fdr_q)
        summary["seconds"] = round(time.time() - task_started, 1)
        summary["starred"] = [[f"{key}={value}:{m}" for key, values in c["slices"].items()
                               for value, e in values.items() for m, d in e["deltas"].items() if d["significant"]]
                              + [f"overall:{m}" for m, d in c["paired"].get("deltas", {}).items() if d["significant"]]
                              for c in comparisons]
        out["tasks"][task] = summary
        log(f"  {task}: {summary['bh_flagged_fraction_mean']:.1%} of cells starred (row noise only "
            f"{summary['row_noise_only_bh_flagged_fraction_mean']:.1%}, unadjusted "
            f"{summary['unadjusted_flagged_fraction_mean']:.1%}); planted effect starred in "
            f"{summary['planted']['starred']}/{pairs} pairs ({summary['seconds']:.0f} s)")
    out["seconds"] = round(time.time() - started, 1)
    return out


def aa_table(result: dict) -> str:
    def pct(x):
        return f"{x:.1%}"

    rows = []
    for task, s in result["tasks"].items():
        lo, hi = s["bh_flagged_fraction_ci95"]
        ulo, uhi = s["unadjusted_flagged_fraction_ci95"]
        alo, ahi = s["bh_any_star_share_ci95"]
        rlo, rhi = s["row_noise_only_bh_flagged_fraction_ci95"]
        rows.append([task, s["pairs"], s["cells_per_pair"][0], f"{pct(s['bh_flagged_fraction_mean'])} [{pct(lo)}, {pct(hi)}]",
                     f"{s['bh_pairs_with_any_star']}/{s['pairs']} [{pct(alo)}, {pct(ahi)}]",
                     f"{pct(s['row_noise_only_bh_flagged_fraction_mean'])} [{pct(rlo)}, {pct(rhi)}]",
                     f"{pct(s['unadjusted_flagged_fraction_mean'])} [{pct(ulo)}, {pct(uhi)}]",
                     f"{s['unadjusted_pairs_with_any_flag']}/{s['pairs']}", "met" if s["within_q"] else "missed"])
    power = [[task, s["planted"]["slice"], s["planted"]["metric"], s["planted"]["effect"],
              f"{s['planted']['starred']}/{s['planted']['pairs']} [{pct(s['planted']['power_ci95'][0])}, "
              f"{pct(s['planted']['power_ci95'][1])}]",
              f"{s['planted']['row_noise_only_starred']}/{s['planted']['pairs']}"]
             for task, s in result["tasks"].items() if "planted" in s]
    planted = ("\n\nPlanted effect (the same pairs, B made better on one slice):\n\n" + markdown_table(
        ["task", "slice", "metric", "effect", "starred [95% CI]", "starred, row noise only"], power)) if power else ""
    return (f"### A/A placebo for `verifily compare` (same data and config, two seeds; {result['pairs']} pairs per "
            f"task; BH at q={result['q']:.2f})\n\n" + markdown_table(
                ["task", "pairs", "cells per pair", "cells starred [95% CI]", "pairs with any star [95% CI]",
                 "BH on row noise alone [95% CI]", "unadjusted 95% interval excludes 0 [95% CI]",
                 "pairs with any unadjusted flag", "target <= q"], rows) + planted)


def main(argv=None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.aa", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    from bench.common import RESULTS, machine, quiet_libraries, set_threads, write_result

    set_threads(args.threads)
    quiet_libraries()
    work = Path(args.work or tempfile.mkdtemp(prefix="verifily-aa-"))
    result = run_aa(work, args.pairs, [t for t in args.tasks.split(",") if t])
    result["machine"] = machine()
    write_result("aa", result, Path(args.out) if args.out else RESULTS)
    print(aa_table(result))
    print(json.dumps({t: s["bh_flagged_fraction_mean"] for t, s in result["tasks"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
