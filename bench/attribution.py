"""Calibration of `verifily attribute`'s tag verdicts at the defaults: placebo, clean-but-shifted sources, power.

``python -m bench.attribution [--trials 40] [--regimes noisy,low-noise] [--kinds ...] [--workers 2]`` (also
``python -m bench --only attribution``). Each trial is a real attribution experiment: datasets stored and
derived with the library's own functions, every arm trained and evaluated by the pipeline's stage
functions in-process (no Prefect: the statistics are the subject here, not the orchestration), and judged
by ``attribution.analyze`` at the CLI's defaults: ``DEFAULT_SEEDS`` seeds, ``DEFAULT_CONTROLS`` controls per
size and seed (``--controls`` trains more; fewer are judged from the same runs), the whole test split as the
target, Holm over the values at alpha 0.05. Every trial draws a new dataset.

Regimes (the noise levels the tool ships for):
- ``noisy``: the tiny BERT fixture, classification, full fine-tune, 30 optimizer steps at a constant
  3e-3, batch 16: large seed-to-seed spread.
- ``low-noise``: a tiny Llama (pre-trained on the fixture corpus), LoRA SFT at the default LoRA settings,
  3 epochs, batch 8 x 4, cosine schedule to zero: the seed spread is small against the spread of random
  subsets, the regime where a test that ignores that rows are one draw calls placebos.
- ``converged``: the tiny BERT classifier of ``noisy`` trained to convergence (200 steps, 1e-3, cosine
  with warm-up): every seed learns the rule, so seed noise is small and a harmful source stands out.

Experiments (``kind``):
- ``placebo-coin``: clean rows, each with a coin-flip tag ``coin: heads|tails``; both values attributed.
  Every hurts/helps is false; the figure is P(any false verdict in a call).
- ``shifted``: three clean sources with different inputs (classification: own templates and word subsets;
  SFT: one task each) and one shared labelling rule; all three attributed. "hurts" is wrong; "helps" is a
  right answer on the whole test split (each source covers test rows the others do not).
- ``power``: a ``scraped`` source of 120 train rows (a third of 360) with random labels (classification)
  or swapped outputs (SFT: each row answered with another scraped row's output), beside a clean ``human``
  source; both attributed. Power: scraped called hurts; wrong: human called hurts.
Rates come with exact Clopper-Pearson 95% intervals. Results: bench/results/attribution-<regime>.json.
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
from typing import Dict, List, Optional

RESULTS = Path(__file__).resolve().parent / "results"
TEST_ROWS = int(os.environ.get("VERIFILY_BENCH_TEST_ROWS", "90"))
KINDS = ("placebo-coin", "shifted", "power")
REGIMES = ("noisy", "low-noise", "converged")
CLASSIFICATION = ("noisy", "converged")
EPOCHS = int(os.environ.get("VERIFILY_BENCH_EPOCHS", "10"))  # low-noise: near convergence
TRAIN_ROWS = {"placebo-coin": 120, "shifted": 180,
              "power": int(os.environ.get("VERIFILY_BENCH_POWER_ROWS", "360"))}  # a third of them scraped
CONTROLS = int(os.environ.get("VERIFILY_BENCH_CONTROLS", "0")) or None  # None: the CLI's DEFAULT_CONTROLS
CONVERGED_STEPS = 200  # converged regime: cosine to zero over 200 steps of 16 (measured: every seed of the fixture
                       # classifier reaches the same accuracy, 0.86-0.88, where 30 constant-rate steps split seeds
                       # between learning and collapsing to one class)


def _config(regime: str, model: Path, ref: str, seed: int) -> dict:
    if regime == "converged":  # the same classifier trained to convergence: every seed learns the rule
        training = {"num_epochs": 100, "max_steps": CONVERGED_STEPS, "batch_size": 16, "gradient_accumulation_steps": 1,
                    "learning_rate": 1e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.1, "max_seq_length": 32,
                    "save_steps": 1000, "eval_steps": 1000, "attribution_snapshots": 0}
        return {"task": "classification", "base_model": str(model), "dataset_version": ref, "seed": seed,
                "training": training, "lora": {"enabled": False},
                "eval": {"bootstrap_samples": 0, "hard_examples": 5, "slice_by_tags": []}}
    if regime == "noisy":
        training = {"num_epochs": 50, "max_steps": 30, "batch_size": 16, "gradient_accumulation_steps": 1,
                    "learning_rate": 3e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0, "max_seq_length": 32,
                    "save_steps": 1000, "eval_steps": 1000, "attribution_snapshots": 0}
        return {"task": "classification", "base_model": str(model), "dataset_version": ref, "seed": seed,
                "training": training, "lora": {"enabled": False},
                "eval": {"bootstrap_samples": 0, "hard_examples": 5, "slice_by_tags": []}}
    training = {"num_epochs": EPOCHS, "batch_size": 8, "gradient_accumulation_steps": 4, "learning_rate": 3e-3,
                "lr_scheduler": "cosine", "max_seq_length": 64, "save_steps": 1000, "eval_steps": 1000,
                "attribution_snapshots": 0}
    return {"task": "sft", "base_model": str(model), "dataset_version": ref, "seed": seed, "training": training,
            "prompt": {"format": "template"},
            "eval": {"bootstrap_samples": 0, "hard_examples": 5, "slice_by_tags": [], "metrics": ["loss"],
                     "baseline": False}}


def train_and_score(regime: str, model: Path, ref: str, seed: int, work: Path):
    """One arm at one seed through the pipeline's stages; the per-example table attribution reads."""
    import pandas as pd
    import yaml

    from verifily_train.attribution import per_example_frame
    from verifily_train.config import load_config
    from verifily_train.pipeline import runner as stages
    from verifily_train.pipeline.fingerprint import fingerprint_stage

    folder = Path(tempfile.mkdtemp(dir=work))
    try:
        config = _config(regime, model, ref, seed)
        (folder / "train.yaml").write_text(yaml.safe_dump(config))
        cfg = load_config(str(folder / "train.yaml"))
        fp = fingerprint_stage(cfg, work / "cache")
        outs = {name: folder / name for name in ("tokenize", "train", "evaluate")}
        for path in outs.values():
            path.mkdir()
        tokenized = dict(stages.run_uncached("tokenize", cfg, fp, outs["tokenize"], folder), dir=str(outs["tokenize"]))
        trained = dict(stages.run_uncached("train", cfg, fp, outs["train"], folder, tokenize=tokenized), dir=str(outs["train"]))
        evaluated = stages.run_uncached("evaluate", cfg, fp, outs["evaluate"], folder, tokenize=tokenized, train=trained)
        return per_example_frame(pd.read_parquet(outs["evaluate"] / evaluated["predictions"]), config["task"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- data ---------------------------------------------------------------------------------------------------

def _cls_text(rng: random.Random, label: str, style: int) -> str:
    from verifily_train.fixtures.data import NEGATIVE, NEUTRAL, POSITIVE, SUBJECTS

    words = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label]
    if style < 0:  # any template, any word
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))
    own = words[style::3]  # each shifted source its own third of every word list (one labelling rule)
    subject = rng.choice(SUBJECTS)
    return [f"the {subject} was {rng.choice(own)} and {rng.choice(own)}", f"this {subject} is {rng.choice(own)}",
            " ".join(rng.choice(own) for _ in range(rng.randint(2, 4)))][style]


def _cls_rows(kind: str, n: int, rng: random.Random, train: bool) -> List[dict]:
    labels = ["positive", "negative", "neutral"]
    rows = []
    for i in range(n):
        label = rng.choice(labels)
        if kind == "shifted":
            style = i % 3
            source = ("human", "synthetic", "web")[style]
        else:
            style = -1
            source = "scraped" if kind == "power" and i % 3 == 0 else "human"
        text = _cls_text(rng, label, style)
        if train and kind == "power" and source == "scraped":
            label = rng.choice(labels)  # random labels: the harmful source
        rows.append({"text": text, "label": label, "tags": {"source": source, "coin": rng.choice(["heads", "tails"])}})
    return rows


def _sft_rows(kind: str, n: int, rng: random.Random, train: bool) -> List[dict]:
    from verifily_train.fixtures.data import ANIMALS, COLORS, OPPOSITES

    def task_row(which: int) -> dict:
        if which == 0:
            a, b = rng.choice(OPPOSITES)
            return {"instruction": "Give the opposite of the word.", "input": a, "output": b}
        if which == 1:
            words = " ".join(rng.choice(COLORS) for _ in range(rng.randint(1, 4)))
            return {"instruction": "Repeat the colors exactly.", "input": words, "output": words}
        animal = rng.choice(ANIMALS)
        return {"instruction": "Write the animal twice.", "input": animal, "output": f"{animal} {animal}"}

    rows = []
    for i in range(n):
        if kind == "shifted":
            row, source = task_row(i % 3), ("human", "synthetic", "web")[i % 3]
        else:
            row = task_row(rng.randrange(3))
            source = "scraped" if kind == "power" and i % 3 == 0 else "human"
        rows.append(dict(row, tags={"source": source, "coin": rng.choice(["heads", "tails"])}))
    if train and kind == "power":  # swapped outputs: each scraped row answered with another scraped row's output
        scraped = [r for r in rows if r["tags"]["source"] == "scraped"]
        outputs = [r["output"] for r in scraped]
        for r, out in zip(scraped, outputs[1:] + outputs[:1]):
            r["output"] = out
    return rows


def _store(regime: str, kind: str, home: Path, name: str, rng: random.Random):
    from verifily_train.dataset.store import create_version
    from verifily_train.fixtures.data import write_jsonl

    make = _cls_rows if regime in CLASSIFICATION else _sft_rows
    task = "classification" if regime in CLASSIFICATION else "sft"
    folder = home.parent / f"data-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {split: write_jsonl(folder / f"{split}.jsonl", make(kind, n, rng, split == "train"))
             for split, n in (("train", TRAIN_ROWS[kind]), ("val", 12), ("test", TEST_ROWS))}
    return create_version(f"ds_{name}", "v1", task, str(paths["train"]), str(paths["val"]), str(paths["test"]),
                          home=home)


# --- one trial ----------------------------------------------------------------------------------------------

def run_trial(regime: str, kind: str, trial: int, seeds: int, model: str, root: str) -> dict:
    """One calibration trial at the defaults; returns the verdicts and each value's statistics."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(1)
    from verifily_train import attribution
    from verifily_train.attribution.stats import DEFAULT_CONTROLS

    global CONTROLS
    CONTROLS = CONTROLS or DEFAULT_CONTROLS

    work = Path(root) / f"{regime}-{kind}-{trial}"
    home = work / "home"
    os.environ["VERIFILY_HOME"] = str(home)
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{regime}/{kind}/{trial}")
    dv = _store(regime, kind, home, f"t{trial}", rng)
    base_seed = 1000 * (trial + 1)
    model_path = Path(model)

    def arm(refs: List[str]) -> list:
        return [train_and_score(regime, model_path, refs[s], base_seed + s, work) for s in range(seeds)]

    by = "coin" if kind == "placebo-coin" else "source"
    tables = {attribution.FULL: arm([dv.ref] * seeds)}
    plan: Dict[str, dict] = {}
    for value in sorted(attribution.train_tag_counts(dv, by)):
        derived = attribution.derive_without(dv, by, value, home=home)
        control = attribution.control_arm(derived["removed_rows"])
        tables[value] = arm([derived["ref"]] * seeds)
        names = attribution.control_arms(derived["removed_rows"], CONTROLS)
        for k, name in enumerate(names):
            if name not in tables:
                tables[name] = arm([attribution.derive_random(dv, derived["removed_rows"], base_seed + s, home=home,
                                                              draw=k)["ref"] for s in range(seeds)])
        plan[value] = {"removed_rows": derived["removed_rows"], "kept_rows": derived["kept_rows"],
                       "derived_dataset": derived["ref"], "control": control, "controls": names}
    task = "classification" if regime in CLASSIFICATION else "sft"
    result = attribution.analyze(task, by, tables, plan, target="test", bootstrap_samples=0)
    shutil.rmtree(work, ignore_errors=True)
    out = {"regime": regime, "kind": kind, "trial": trial, "values": {}}
    for value, entry in result["values"].items():
        cell = entry["slices"][entry["verdict_slice"]]["loss"]
        own = entry["slices"].get(f"{by}={value}", {}).get("loss", {})
        rest = entry["slices"].get(f"{by}!={value}", {}).get("loss", {})
        out["values"][value] = {"verdict": entry["verdict"], "p_adjusted": entry["p_adjusted"], "p": cell["p"],
                                "effect": cell["effect"], "mde": cell["mde"], "se": cell["se"],
                                "seed_sd": cell["seed_sd"], "subset_sd": cell["subset_sd"],
                                "noise_sd": cell["noise_sd"], "random_spread": cell["random_spread"],
                                "in_spreads": cell["in_spreads"], "removal_effect": cell["removal_effect"],
                                "random_removal_effect": cell["random_removal_effect"],
                                "per_seed": cell["per_seed"], "removal_per_seed": cell["removal_per_seed"],
                                "random_per_seed": cell["random_per_seed"],
                                "random_per_run": cell["random_per_run"], "controls": cell["controls"],
                                "effect_on_own_rows": own.get("effect"), "effect_on_other_rows": rest.get("effect"),
                                "removed_rows": entry["removed_rows"]}
    return out


# --- summaries ----------------------------------------------------------------------------------------------

def rejudge(trial: dict, alpha: float = 0.05, margin: Optional[float] = None, controls: Optional[int] = None,
            floor: Optional[float] = None, rank: bool = True) -> dict:
    """The trial's verdicts by the library's current test, from its stored per-seed differences (a change
    of the test re-judges every stored trial without retraining). ``controls``: judge with the first that many
    of the trial's control arms per seed (default: the CLI's, or as many as the trial has if fewer; a trial
    trained with more controls answers for fewer too)."""
    from verifily_train.attribution.stats import (DEFAULT_CONTROLS, SUBSET_FLOOR, SUBSET_MARGIN, adjust,
                                                  claim_verdicts, one_draw_test, rank_test)

    values = list(trial["values"])
    tests = []
    margin = SUBSET_MARGIN if margin is None else margin
    floor = SUBSET_FLOOR if floor is None else floor
    for v in values:
        e = trial["values"][v]
        within = e["removal_per_seed"]
        if e.get("random_per_run"):
            have = int(e.get("controls") or 1)
            use = min(controls or DEFAULT_CONTROLS, have)  # the CLI's default unless told
            per = [e["random_per_run"][i * have:i * have + use] for i in range(len(within))]
            random_ = [y for ys in per for y in ys]
            diffs = [x - sum(ys) / len(ys) for x, ys in zip(within, per)]
        else:  # trials of one control per seed
            random_ = e.get("random_per_seed") or [x - d for x, d in zip(within, e["per_seed"])]
            diffs = e["per_seed"]
        test = one_draw_test(diffs, within, random_, alpha, len(values), margin=margin, floor=floor)
        test.update(removal_effect=sum(within) / len(within), random=random_)
        test["rank_p"] = rank_test(test["removal_effect"], random_)["rank_p"]
        tests.append(test)
    # the library's rule (analysis._apply_verdicts, the loss the metric): one-sided claims, a "hurts" from the
    # normal model, a "helps" from the rank p (stats.claim_verdicts); ``rank=False``: the two-sided test before it
    test_only = adjust([t["p"] for t in tests], "holm")
    if rank:
        claims = claim_verdicts([{"p": t["p"], "harmful": t["mean"] < 0, "removal_effect": t["removal_effect"],
                                  "random": t["random"], "sign": -1.0} for t in tests], alpha, "holm")
        adjusted = [c["p_adjusted"] for c in claims]
        called = [c["verdict"] for c in claims]
    else:
        adjusted = test_only
        called = [("hurts" if t["mean"] < 0 else "helps") if p is not None and p <= alpha else None
                  for t, p in zip(tests, adjusted)]
    out = dict(trial, values={})
    for v, t, p, q, c in zip(values, tests, adjusted, test_only, called):
        verdict = c if c is not None and t["mean"] != 0 else \
            "not certified at this budget" if t["mean"] > 0 and q is not None and q <= alpha else \
            "no measurable effect at this budget"
        out["values"][v] = dict(trial["values"][v], verdict=verdict, p_adjusted=p, p=t["p"], mde=t["mde"], se=t["se"],
                                subset_sd=t["subset_sd"], noise_sd=t["noise_sd"], rank_p=t["rank_p"])
    return out


DESIGN_MARGINS = (2.0, 1.5, 1.0)


def summarize(trials: List[dict]) -> dict:
    """Per regime and kind: P(any false verdict in a call), power, wrong calls, with exact intervals; the same
    figure under the retired one-sample t over seeds (same trials, same target) beside it."""
    from verifily_train.attribution.stats import binomial_interval

    judged = [rejudge(t) for t in trials]
    retired = [_old_verdicts(t) for t in trials]
    out: Dict[str, dict] = {}
    for regime, kind in sorted({(t["regime"], t["kind"]) for t in trials}):
        pick = [i for i, t in enumerate(trials) if t["regime"] == regime and t["kind"] == kind]
        mine = [judged[i] for i in pick]
        s = {"headline": _headline_metric(kind), "measured": binomial_interval(sum(_counted(kind, t) for t in mine), len(mine)),
             "retired_t": binomial_interval(sum(_counted(kind, retired[i]) for i in pick), len(pick))}
        if kind == "power":
            s["clean_called_hurts"] = binomial_interval(sum(t["values"]["human"]["verdict"] == "hurts" for t in mine),
                                                        len(mine))
            s.update(median_effect=_median([t["values"]["scraped"]["effect"] for t in mine]),
                     median_mde=_median([t["values"]["scraped"]["mde"] for t in mine]),
                     median_in_spreads=_median([t["values"]["scraped"]["in_spreads"] for t in mine]))
        elif kind == "shifted":
            s["called_helps_per_value"] = binomial_interval(
                sum(t["values"][v]["verdict"] == "helps" for t in mine for v in t["values"]),
                sum(len(t["values"]) for t in mine))
            s.update(median_effect=_median([e["effect"] for t in mine for e in t["values"].values()]),
                     median_effect_on_other_rows=_median([e["effect_on_other_rows"] for t in mine
                                                          for e in t["values"].values()]))
        else:
            s["median_mde"] = _median([e["mde"] for t in mine for e in t["values"].values()])
        # the calls with a "not certified" line (the normal model rejects on the "helps" side, the rank p does not:
        # no verdict, said in words), and the same trials judged without the rank rule (the test before it)
        s["calls_not_certified"] = binomial_interval(
            sum(any(e["verdict"] == "not certified at this budget" for e in t["values"].values()) for t in mine),
            len(mine))
        s["without_rank_rule"] = binomial_interval(sum(_counted(kind, rejudge(trials[i], rank=False)) for i in pick),
                                                   len(pick))
        recorded = min(int(e.get("controls") or 1) for t in mine for e in t["values"].values())
        s["designs"] = {f"controls={k} margin={m:g}": binomial_interval(
            sum(_counted(kind, rejudge(trials[i], margin=m, controls=k)) for i in pick), len(pick))
            for k in range(1, recorded + 1) for m in DESIGN_MARGINS}  # the same runs judged by other designs
        cells = [e for t in mine for e in t["values"].values() if e["subset_sd"] is not None]
        s["median_noise_sd"] = _median([e["noise_sd"] for e in cells])
        s["median_subset_sd"] = _median([e["subset_sd"] for e in cells])
        out[f"{regime}/{kind}"] = s
    return out


def _headline_metric(kind: str) -> str:
    return {"power": "harmful source called hurts", "shifted": "trials with any clean source called hurts"}.get(
        kind, "trials with any false hurts/helps")


def _counted(kind: str, trial: dict) -> bool:
    verdicts = {v: e["verdict"] for v, e in trial["values"].items()}
    if kind == "power":
        return verdicts["scraped"] == "hurts"
    if kind == "shifted":
        return "hurts" in verdicts.values()
    return any(v in ("hurts", "helps") for v in verdicts.values())


def _old_verdicts(trial: dict) -> dict:
    """The trial judged by the retired test: a one-sample t over seeds of (value - control), Holm."""
    from verifily_train.attribution.stats import adjust

    values = list(trial["values"])
    adjusted = adjust([_old_p(trial["values"][v]["per_seed"]) for v in values], "holm")
    return {"values": {v: {"verdict": ("hurts" if sum(trial["values"][v]["per_seed"]) < 0 else "helps")
                           if p is not None and p <= 0.05 else "none"} for v, p in zip(values, adjusted)}}


def _old_p(diffs) -> Optional[float]:
    """The retired one-sample t over seeds (ignores that a value's rows are one draw), for the record."""
    from scipy import stats

    return float(stats.ttest_1samp(diffs, 0.0).pvalue) if len(diffs) > 1 else None


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def render(summary: dict) -> str:
    def rate(r):
        return f"{r['k']}/{r['n']} = {r['rate']:.0%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]"

    limits = {"power": ">= 80%", "shifted": "<= 5%", "placebo-coin": "<= 5%"}
    lines = ["| regime / experiment | what is counted | limit | measured (exact 95% CI) | retired seed-only t |",
             "|---|---|---|---|---|"]
    for name, s in summary.items():
        kind = name.split("/", 1)[1]
        lines.append(f"| {name} | {s['headline']} | {limits[kind]} | {rate(s['measured'])} | {rate(s['retired_t'])} |")
        if kind == "power":
            lines.append(f"| {name} | clean source called hurts | - | {rate(s['clean_called_hurts'])} | - |")
        elif kind == "shifted":
            lines.append(f"| {name} | values called helps (right on the whole test split) | - | "
                         f"{rate(s['called_helps_per_value'])} | - |")
    return "\n".join(lines)


def build_model(regime: str, root: Path) -> Path:
    from verifily_train.fixtures.models import build_model as build, pretrain_causal_lm

    if regime in CLASSIFICATION:
        return build("bert", root / "tiny-bert")
    return pretrain_causal_lm(build("llama", root / "tiny-llama"))


def main(argv=None) -> int:
    from verifily_train.attribution.stats import DEFAULT_SEEDS

    parser = argparse.ArgumentParser(prog="python -m bench.attribution", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, help="trials per regime and experiment (default 40)")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds per arm (default {DEFAULT_SEEDS}, the CLI's)")
    parser.add_argument("--workers", type=int, default=2, help="trials in parallel, one torch thread each")
    parser.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated among {', '.join(REGIMES)}")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated among {', '.join(KINDS)}")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where attribution-<regime>.json go")
    parser.add_argument("--power-rows", type=int, default=None,
                        help="train rows of the power experiment (default 360, a third scraped); another size writes "
                             "attribution-<regime>-power<N>.json")
    parser.add_argument("--controls", type=int, default=None,
                        help="random-subset controls per size and seed to train (default: the CLI's); the summary "
                             "also judges the same runs with fewer (its 'designs')")
    parser.add_argument("--kind-trials", default="", help="per-experiment trial counts overriding --trials, e.g. power=12")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.controls is not None:  # read again by the worker processes
        os.environ["VERIFILY_BENCH_CONTROLS"] = str(args.controls)
        global CONTROLS
        CONTROLS = args.controls
    if args.power_rows is not None:  # read again by the worker processes, which import this module afresh
        os.environ["VERIFILY_BENCH_POWER_ROWS"] = str(args.power_rows)
        TRAIN_ROWS["power"] = args.power_rows
    root = Path(tempfile.mkdtemp(prefix="verifily-bench-attr-"))
    try:
        for regime in args.regimes.split(","):
            _run_regime(regime, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _run_regime(regime: str, args, root: Path) -> None:
    model = build_model(regime, root / "models")
    from verifily_train.attribution.stats import DEFAULT_CONTROLS

    controls = CONTROLS or DEFAULT_CONTROLS
    suffix = ("" if TRAIN_ROWS["power"] == 360 else f"-power{TRAIN_ROWS['power']}") + \
        ("" if controls == 1 else f"-controls{controls}")
    out = Path(args.out_dir) / f"attribution-{regime}{suffix}.json"
    settings = {"seeds": args.seeds, "regime": regime, "test_rows": TEST_ROWS, "alpha": 0.05, "correction": "holm",
                "target": "test", "train_rows": TRAIN_ROWS, "test": "one-draw t", "controls": controls}
    done: List[dict] = []
    if out.is_file():  # resume: keep finished trials of the same settings
        previous = json.loads(out.read_text())
        if previous.get("settings") == settings:
            done = previous.get("trials", [])
    have = {(t["kind"], t["trial"]) for t in done}
    counts = {k: args.trials for k in args.kinds.split(",")}
    counts.update({k: int(n) for k, _, n in (item.partition("=") for item in args.kind_trials.split(",") if item)})
    todo = [(k, i) for i in range(max(counts.values())) for k in counts if i < counts[k] and (k, i) not in have]
    started = time.time()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_trial, regime, k, i, args.seeds, str(model), str(root)) for k, i in todo]
        for future in futures:
            done.append(future.result())
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"settings": settings, "summary": summarize(done), "trials": done}, indent=1))
            print(f"[{time.time() - started:.0f}s] {regime} {done[-1]['kind']} #{done[-1]['trial']}: "
                  + ", ".join(f"{v}={e['verdict']} (p={e['p_adjusted']})" for v, e in done[-1]["values"].items()),
                  flush=True)
    record = {"settings": settings, "summary": summarize(done), "trials": done}
    out.write_text(json.dumps(record, indent=1))
    print(render(record["summary"]))


if __name__ == "__main__":
    sys.exit(main())
