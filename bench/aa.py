"""Suite ``aa``: calibration of ``verifily compare``, by the yardstick P(any star in a call), for both questions.

``python -m bench.aa [--pairs 100] [--replicates 3] [--power-trials 40]`` (also ``python -m bench --only aa``).

Every run is real: the tiny BERT fixture, classification, full fine-tune, trained by the pipeline's stage
functions in-process (no Prefect: the statistics are the subject; the tokenized data is shared as the
cache shares it), on the tagged fixture data (sources human / synthetic / ai_contaminated, plus difficulty
and length tags: 12 slice x 2 metric cells and the overall cells per call).

Group level ("did the change move the metric?", ``compare GROUP_A GROUP_B``):
- A/A: two groups of ``replicates`` runs of the same data and config at disjoint seeds, ``pairs`` pairs,
  every pair on fresh seeds (independent calls). Every star is false: the figure is P(any star), which BH
  at q bounds by q when every null is true.
- power, uniform: A trains on a version where 30% of every source's train labels are random, B on the
  clean version (a data fix that moves every slice); one-slice: A's version has random labels on the
  synthetic-template train rows only, B is the clean version (a fix aimed at one slice). B is the A/A
  pair's first group; A is trained at the same seeds (what ``verifily train --seeds N`` gives on both
  sides). Power = share of trials whose target cell (overall accuracy; synthetic accuracy) is starred.

Model level ("do these two models differ on these rows?", ``compare RUN_A RUN_B``):
- two seeds: the first run of each A/A pair's two groups; how often two seeds' models "differ" on these
  rows (a true statement about two models, and the reason a claim about a change needs replicates);
- exchangeable: per row a coin decides which of those two runs' predictions is A's: A and B are
  exchangeable by construction, the row-level test's exact null; P(any star) must be <= q.

Rates carry exact Clopper-Pearson 95% intervals. Results: bench/results/aa.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from bench.common import markdown_table

SIZES = {"train": 160, "test": 240}
NOISY_SHARE = 0.30  # the uniform case: this share of every source's train labels drawn at random
BASE = {"training": {"num_epochs": 20, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                     "warmup_ratio": 0.1, "max_seq_length": 32, "save_steps": 10000, "eval_steps": 10000,
                     "logging_steps": 50, "attribution_snapshots": 0},
        "lora": {"enabled": False},
        "eval": {"slice_by_tags": ["source", "difficulty", "length_bucket"], "hard_examples": 3,
                 "bootstrap_samples": 0},
        "runtime": {"progress": False}}
CHANGES = {"uniform": ("overall", None, "accuracy"), "one-slice": ("source", "synthetic", "accuracy")}


def _share(k: int, n: int) -> dict:
    from scipy import stats

    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci95": None}
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return {"k": int(k), "n": int(n), "rate": k / n, "ci95": [float(ci.low), float(ci.high)]}


class Trainer:
    """Trains one run of a (data variant, epochs, seed) through the pipeline's stages, tokenization shared."""

    def __init__(self, work: Path, log=print):
        import random

        from verifily_train.fixtures.data import write_jsonl, write_splits
        from verifily_train.fixtures.models import build_model

        self.work, self.log = work, log
        self.model = build_model("bert", work / "model-bert")
        base = write_splits(work / "data-base", "classification", SIZES, seed=5)
        rows = [json.loads(line) for line in base["train"].read_text().splitlines()]
        rng = random.Random(9)
        labels = ("positive", "negative", "neutral")
        noisy_all = [dict(r, label=rng.choice(labels)) if rng.random() < NOISY_SHARE else r for r in rows]
        noisy_synthetic = [dict(r, label=rng.choice(labels)) if r["tags"]["source"] == "synthetic" else r for r in rows]
        self.data = {"base": base,
                     "noisy-all": {"train": write_jsonl(work / "data-noisy-all/train.jsonl", noisy_all),
                                   "test": base["test"]},
                     "noisy-synthetic": {"train": write_jsonl(work / "data-noisy-synthetic/train.jsonl", noisy_synthetic),
                                         "test": base["test"]}}
        self.shared: Dict[str, dict] = {}
        self.runs_dir = work / "runs"
        self.done = self._finished()  # resume: runs a killed bench already wrote in this work folder

    def _finished(self) -> Dict[tuple, Path]:
        found = {}
        for path in sorted(self.runs_dir.glob("run_*")) if self.runs_dir.is_dir() else []:
            try:
                record = json.loads((path / "run.json").read_text())
            except (OSError, ValueError):
                continue
            config = record.get("job", {}).get("config", {})
            train = str(config.get("data_paths", {}).get("train", ""))
            variant = next((v for v, paths in self.data.items() if str(paths["train"]) == train), None)
            if record.get("status") == "completed" and variant:
                found[(variant, config.get("seed"), config.get("training", {}).get("num_epochs"))] = path
        return found

    def _config(self, variant: str, epochs: int, seed: int):
        from verifily_train.config import load_config

        cfg = json.loads(json.dumps(BASE))
        cfg["training"]["num_epochs"] = epochs
        cfg.update(task="classification", base_model=str(self.model), seed=seed,
                   data_paths={k: str(v) for k, v in self.data[variant].items()})
        return load_config(cfg)

    def run(self, variant: str, seed: int, epochs: int = BASE["training"]["num_epochs"]) -> Path:
        from verifily_train.artifacts.record import RunStart
        from verifily_train.artifacts.run import new_run_id, utc_now
        from verifily_train.pipeline.fingerprint import fingerprint_stage
        from verifily_train.pipeline.runner import STAGES, run_uncached, write_run

        if (variant, seed, epochs) in self.done:
            return self.done[(variant, seed, epochs)]
        cfg = self._config(variant, epochs, seed)
        root = self.work / f"stages-{variant}"
        root.mkdir(parents=True, exist_ok=True)
        if variant not in self.shared:
            fp = fingerprint_stage(cfg, root / "cache")
            done = {}
            for name in ("validate", "tokenize"):  # the seed and epochs are not in their keys
                out = root / name
                out.mkdir(parents=True, exist_ok=True)
                done[name] = dict(run_uncached(name, cfg, fp, out, root / f"work-{name}", **done), dir=str(out))
            self.shared[variant] = {"fp": fp, "done": done}
        fp, done = self.shared[variant]["fp"], dict(self.shared[variant]["done"])
        folder = f"e{epochs}-s{seed}"
        for stage in STAGES[2:]:
            out = root / f"{stage.name}-{folder}"
            out.mkdir(parents=True, exist_ok=True)
            done[stage.name] = dict(run_uncached(stage.name, cfg, fp, out, root / f"work-{stage.name}-{folder}", **done),
                                    dir=str(out))
        start = RunStart(new_run_id(), utc_now(), time.time())
        return Path(write_run(cfg, start, fp, done, self.runs_dir)["path"])


def _side(runs: List[Path], seeds: List[int]) -> dict:
    return {"group_id": None, "runs": runs, "seeds": seeds}


def _starred(result: dict) -> List[str]:
    cells = [("overall", None, result["overall"])] if "overall" in result and "paired" not in result else []
    if "paired" in result:
        cells = [("overall", None, result["paired"].get("deltas", {}))]
    cells += [(k, v, e["deltas"]) for k, vs in result["slices"].items() for v, e in vs.items()]
    return [f"{k}{'' if v is None else '=' + str(v)}:{m}" for k, v, deltas in cells for m, d in deltas.items()
            if d.get("significant")]


def _cell(result: dict, key: str, value, metric: str) -> dict:
    return result["overall"][metric] if key == "overall" else result["slices"][key][str(value)]["deltas"][metric]


def _mixed(run_a: Path, run_b: Path, target: Path, seed: int) -> Path:
    """A copy of ``run_b`` whose predictions take, per row, run_a's or run_b's by a coin: exchangeable with a
    copy taking the other one (what ``_exchangeable_pair`` builds)."""
    import shutil

    import pandas as pd

    from verifily_train.fsio import make_writable

    for stale in (target, target.with_name(target.name + "-other")):  # a resumed bench rebuilds them
        if stale.exists():
            make_writable(stale)
            shutil.rmtree(stale)
    shutil.copytree(run_b, target)
    make_writable(target)
    pa, pb = pd.read_parquet(run_a / "predictions.parquet"), pd.read_parquet(run_b / "predictions.parquet")
    coin = np.random.default_rng(seed).random(len(pa)) < 0.5
    first, second = pa.copy(), pb.copy()
    for column in ("pred_id", "correct"):
        first.loc[coin, column], second.loc[coin, column] = pb.loc[coin, column].to_numpy(), pa.loc[coin, column].to_numpy()
    first.to_parquet(target / "predictions.parquet", index=False)
    other = target.with_name(target.name + "-other")
    shutil.copytree(run_a, other)
    make_writable(other)
    second.to_parquet(other / "predictions.parquet", index=False)
    return target, other


def run_aa(work: Path, pairs: int = 100, replicates: int = 3, power_trials: int = 40, log=print,
           first_pair: int = 0, partial_out: Path = None) -> dict:
    from verifily_train.artifacts.compare import compare_runs
    from verifily_train.artifacts.groups import compare_groups
    from verifily_train.config.schema import EvalSection

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    from bench.common import write_result
    q = EvalSection.fdr_q
    trainer = Trainer(work, log)
    started = time.time()
    calls = {"group_aa": [], "uniform": [], "one-slice": [], "model_two_seeds": [], "model_exchangeable": []}
    for i in range(first_pair, first_pair + pairs):
        seeds_a = [1000 + 2 * replicates * i + j for j in range(replicates)]
        seeds_b = [s + replicates for s in seeds_a]
        group_a = [trainer.run("base", s) for s in seeds_a]
        group_b = [trainer.run("base", s) for s in seeds_b]
        result = compare_groups(_side(group_a, seeds_a), _side(group_b, seeds_b), fdr_q=q)
        calls["group_aa"].append({"starred": _starred(result), "cells": result["fdr"]["cells"],
                                  "overall_accuracy_a": result["overall"]["accuracy"]["a_per_run"],
                                  "overall_accuracy_b": result["overall"]["accuracy"]["b_per_run"]})
        two = compare_runs(group_a[0], group_b[0], bootstrap_samples=0)
        calls["model_two_seeds"].append({"starred": _starred(two), "cells": two["fdr"]["cells"]})
        mixed_a, mixed_b = _mixed(group_a[0], group_b[0], work / "mixed" / f"pair{i}", i)
        exch = compare_runs(mixed_a, mixed_b, bootstrap_samples=0)
        calls["model_exchangeable"].append({"starred": _starred(exch), "cells": exch["fdr"]["cells"]})
        if i - first_pair < power_trials:
            for change, variant in (("uniform", "noisy-all"), ("one-slice", "noisy-synthetic")):
                before = [trainer.run(variant, s) for s in seeds_a]  # A: the version with the flaw; B: fixed
                found = compare_groups(_side(before, seeds_a), _side(group_a, seeds_a), fdr_q=q)
                key, value, metric = CHANGES[change]
                cell = _cell(found, key, value, metric)
                calls[change].append({"starred": _starred(found), "target_starred": bool(cell["significant"]),
                                      "delta": cell["delta"], "mde": cell.get("mde"), "ci95": cell.get("ci95")})
        log(f"  pair {i + 1}/{first_pair + pairs}: group A/A stars {len(calls['group_aa'][-1]['starred'])}; "
            f"two seeds {len(calls['model_two_seeds'][-1]['starred'])}, exchangeable "
            f"{len(calls['model_exchangeable'][-1]['starred'])}"
            + (f"; uniform {calls['uniform'][-1]['target_starred']}, one-slice {calls['one-slice'][-1]['target_starred']}"
               if i - first_pair < power_trials else "") + f" ({time.time() - started:.0f} s)")
        if partial_out is not None:  # after every pair: a cut-short bench keeps what it measured
            write_result("aa", {"settings": {"pairs": len(calls["group_aa"]), "replicates": replicates, "q": q,
                                             "first_pair": first_pair, "partial": True},
                                "summary": summarize(calls), "calls": calls,
                                "seconds": round(time.time() - started, 1)}, partial_out)
    settings = {"pairs": pairs, "replicates": replicates, "power_trials": min(power_trials, pairs), "q": q,
                "sizes": SIZES, "noisy_share": NOISY_SHARE, "training": BASE["training"],
                "task": "classification (tiny BERT, full fine-tune)"}
    return {"settings": settings, "summary": summarize(calls), "calls": calls,
            "seconds": round(time.time() - started, 1)}


def summarize(calls: dict) -> dict:
    """The rates of every case, with exact intervals, from the per-call records."""
    pairs = len(calls["group_aa"])
    summary = {
        "group_aa": dict(_share(sum(bool(c["starred"]) for c in calls["group_aa"]), pairs),
                         question="did the change move the metric? (A/A: no change)", yardstick="P(any star)"),
        "model_exchangeable": dict(_share(sum(bool(c["starred"]) for c in calls["model_exchangeable"]), pairs),
                                   question="do these two models differ on these rows? (exchangeable by construction)",
                                   yardstick="P(any star)"),
        "model_two_seeds": dict(_share(sum(bool(c["starred"]) for c in calls["model_two_seeds"]), pairs),
                                question="do two seeds' models differ on these rows? (not an error: why a change "
                                         "needs replicates)", yardstick="share of pairs with any star"),
    }
    for change in ("uniform", "one-slice"):
        trials = calls[change]
        key, value, metric = CHANGES[change]
        summary[change] = dict(_share(sum(c["target_starred"] for c in trials), len(trials)),
                               target=f"{key}{'' if value is None else '=' + value}:{metric}",
                               median_delta=float(np.median([c["delta"] for c in trials])) if trials else None,
                               median_mde=float(np.median([c["mde"] for c in trials if c["mde"] is not None]))
                               if trials else None)
    return summary


def merge(parts: List[dict]) -> dict:
    """One result from runs over disjoint pair ranges (``--first-pair``): calls concatenated, rates recomputed."""
    calls = {k: [c for p in parts for c in p["calls"][k]] for k in parts[0]["calls"]}
    full = next((p["settings"] for p in parts if "sizes" in p["settings"]), None)
    settings = dict(full or {"replicates": parts[0]["settings"]["replicates"], "q": parts[0]["settings"]["q"],
                             "sizes": SIZES, "noisy_share": NOISY_SHARE, "training": BASE["training"],
                             "task": "classification (tiny BERT, full fine-tune)"},
                    pairs=len(calls["group_aa"]), power_trials=len(calls["uniform"]))
    return {"settings": settings, "summary": summarize(calls), "calls": calls,
            "seconds": sum(p["seconds"] for p in parts), "parts": len(parts)}


def aa_table(result: dict) -> str:
    def share(s):
        if not s.get("n"):
            return "-"
        lo, hi = s["ci95"]
        return f"{s['k']}/{s['n']} = {s['rate']:.1%} [{lo:.1%}, {hi:.1%}]"

    st, s = result["settings"], result["summary"]
    rows = [["group (seed level)", "A/A: same config, disjoint seeds", "P(any star) <= q", share(s["group_aa"])],
            ["group (seed level)", f"uniform: {st['noisy_share']:.0%} random train labels in every source -> clean",
             f"{s['uniform']['target']} starred >= 80%", share(s["uniform"])],
            ["group (seed level)", "one slice: random labels on the synthetic-template train rows -> clean",
             f"{s['one-slice']['target']} starred >= 80%", share(s["one-slice"])],
            ["model (row level)", "exchangeable A/B by construction", "P(any star) <= q", share(s["model_exchangeable"])],
            ["model (row level)", "two seeds of one config", "(no target: two models do differ)",
             share(s["model_two_seeds"])]]
    effects = [[c, f"{s[c]['median_delta']:+.4f}" if s[c]["median_delta"] is not None else "-",
                f"±{s[c]['median_mde']:.4f}" if s[c]["median_mde"] is not None else "-"] for c in ("uniform", "one-slice")]
    return (f"### `verifily compare` calibration ({st['task']}; {st['replicates']} runs a side; BH at "
            f"q={st['q']:.2f}; exact 95% intervals)\n\n"
            + markdown_table(["question", "case", "target", "measured"], rows)
            + "\n\nEffect sizes of the power cases (median over trials):\n\n"
            + markdown_table(["case", "median B - A", "median detectable"], effects))


def power_at(work: Path, first_pairs: List[int], replicates: int, log=print) -> dict:
    """Power of both changes at another replicate count, on the same clean runs: trial i's clean side is the
    seeds ``1000 + 6i .. + replicates - 1`` (the A/A pair's runs where they exist), its flawed side the
    same seeds of the flawed version (trained as needed)."""
    from verifily_train.artifacts.groups import compare_groups
    from verifily_train.config.schema import EvalSection

    trainer = Trainer(Path(work), log)
    calls = {"uniform": [], "one-slice": []}
    for i in first_pairs:
        seeds = [1000 + 6 * i + j for j in range(replicates)]  # pair i's seeds at 3 replicates a side
        clean = [trainer.run("base", s) for s in seeds]
        for change, variant in (("uniform", "noisy-all"), ("one-slice", "noisy-synthetic")):
            flawed = [trainer.run(variant, s) for s in seeds]
            found = compare_groups(_side(flawed, seeds), _side(clean, seeds), fdr_q=EvalSection.fdr_q)
            key, value, metric = CHANGES[change]
            cell = _cell(found, key, value, metric)
            calls[change].append({"starred": _starred(found), "target_starred": bool(cell["significant"]),
                                  "delta": cell["delta"], "mde": cell.get("mde"), "ci95": cell.get("ci95")})
        log(f"  trial {i}: uniform {calls['uniform'][-1]['target_starred']}, one-slice "
            f"{calls['one-slice'][-1]['target_starred']}")
    out = {}
    for change in calls:
        trials = calls[change]
        out[change] = dict(_share(sum(c["target_starred"] for c in trials), len(trials)),
                           median_delta=float(np.median([c["delta"] for c in trials])),
                           median_mde=float(np.median([c["mde"] for c in trials if c["mde"] is not None])))
    return {"replicates": replicates, "trials": len(first_pairs), "summary": out, "calls": calls}


def aa_at(work: Path, replicates: int, calls: List[int], log=print) -> dict:
    """Group A/A calls at another replicate count: call c draws A and B from the 2 x replicates seeds
    ``base(c) ..``, disjoint from every other call's (``base(c) = 1000 + 12 c``: two 3-replicate pairs' seeds,
    whose runs a full bench already trained; the rest are trained here)."""
    from verifily_train.artifacts.groups import compare_groups
    from verifily_train.config.schema import EvalSection

    trainer = Trainer(Path(work), log)
    out = []
    for c in calls:
        seeds = [1000 + 12 * c + j for j in range(2 * replicates)]
        runs = [trainer.run("base", s) for s in seeds]
        found = compare_groups(_side(runs[:replicates], seeds[:replicates]), _side(runs[replicates:], seeds[replicates:]),
                               fdr_q=EvalSection.fdr_q)
        out.append({"starred": _starred(found), "cells": found["fdr"]["cells"]})
        log(f"  A/A call {c} at {replicates} a side: {len(out[-1]['starred'])} stars")
    return {"replicates": replicates, "calls": out,
            "group_aa": _share(sum(bool(c["starred"]) for c in out), len(out))}


def main(argv=None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.aa", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--power-trials", type=int, default=40)
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--first-pair", type=int, default=0, help="index of the first pair (disjoint seeds per "
                                                                   "range: run ranges in parallel, then --merge)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge results of pair ranges")
    parser.add_argument("--power-at", type=int, default=None, metavar="N",
                        help="only the power cases at N replicates, for the pairs --first-pair .. + --power-trials "
                             "(reuses the runs in --work)")
    parser.add_argument("--aa-at", type=int, default=None, metavar="N",
                        help="only group A/A calls at N replicates a side, calls --first-pair .. + --pairs")
    args = parser.parse_args(argv)
    if args.aa_at:
        from bench.common import quiet_libraries, set_threads

        set_threads(args.threads)
        quiet_libraries()
        result = aa_at(Path(args.work), args.aa_at, list(range(args.first_pair, args.first_pair + args.pairs)))
        out = Path(args.out or ".") / f"aa-aa-{args.aa_at}-{args.first_pair}.json"
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["group_aa"]))
        return 0
    if args.power_at:
        from bench.common import quiet_libraries, set_threads

        set_threads(args.threads)
        quiet_libraries()
        result = power_at(Path(args.work), list(range(args.first_pair, args.first_pair + args.power_trials)),
                          args.power_at)
        out = Path(args.out or ".") / f"aa-power-{args.power_at}-{args.first_pair}.json"
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["summary"], indent=1))
        return 0
    if args.merge:
        from bench.common import RESULTS, write_result

        result = merge([json.loads(Path(p).read_text()) for p in args.merge])
        write_result("aa", result, Path(args.out) if args.out else RESULTS)
        print(aa_table(result))
        return 0
    from bench.common import RESULTS, machine, quiet_libraries, set_threads, write_result

    set_threads(args.threads)
    quiet_libraries()
    work = Path(args.work or tempfile.mkdtemp(prefix="verifily-aa-"))
    result = run_aa(work, args.pairs, args.replicates, args.power_trials, first_pair=args.first_pair,
                    partial_out=Path(args.out) if args.out else None)
    result["machine"] = machine()
    write_result("aa", result, Path(args.out) if args.out else RESULTS)
    print(aa_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
