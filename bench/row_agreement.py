"""Do row scores summed per tag value agree with the tag-level verdicts of retraining? (issue 24's agreement target)

For each setting, through the CLI as a user runs it: ``verifily train``, then ``verifily attribute RUN --by
source --json`` (leave-one-value-out retraining, 8 seeds, size-matched random-removal controls, Holm), then
``verifily attribute RUN --rows --methods all --json``. For every value the verdict calls significant (hurts
or helps), the sign of each method's per-value **excess** (the sum over the value's rows of score minus the
mean score of all train rows: to first order, removing the value against removing as many average rows,
the comparison the verdict makes) is compared with the verdict: hurts <-> excess > 0, helps <-> excess < 0.

Settings:
- ``fixture-cls``: the tiny BERT fixture, 200 train rows, 20% relabelled at random and tagged
  ``source: scraped`` with 10% of the clean rows (bench/row_attribution.py's planted errors);
- ``fixture-sft``: the tiny Llama fixture, 160 rows, 20% with outputs swapped between rows, tagged the same way;
- ``example-cls``: the shipped classification example (``verifily demo --task classification``'s data and
  config) on the embedded all-MiniLM-L6-v2;
- ``example-sft``: the shipped SFT example on the embedded SmolLM2-135M-Instruct, the demo's config with
  ``training.max_steps`` = ``--sft-steps`` (default 40, half the demo's 80, to fit a CPU session) and an
  evaluation of the loss alone (no generation, no baseline: the verdict is on loss).

    python -m bench.row_agreement [--settings fixture-cls,fixture-sft,example-cls,example-sft] [--seeds 8]

Writes bench/results/row-agreement.json and prints one line per significant verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from bench.row_attribution import SIZES, _cls_rows, _config, _sft_rows
from bench.row_verify import _cli

RESULTS = Path(__file__).resolve().parent / "results" / "row-agreement.json"
SETTINGS = ("fixture-cls", "fixture-sft", "example-cls", "example-sft")


def _json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout[done.stdout.index("{"):])


def _scraped_sft_rows(n: int, rng: random.Random, share: float, split: str) -> List[dict]:
    """bench/row_attribution's swapped-output rows, the swapped ones (and 10% of the others) tagged scraped."""
    rows = _sft_rows(n, rng, share, split)
    for row in rows:
        if row["tags"]["planted"] == "yes" or rng.random() < 0.1:
            row["tags"] = dict(row["tags"], source="scraped")
    return rows


def _fixture_config(setting: str, work: Path) -> dict:
    from verifily_train.fixtures.data import write_jsonl
    from verifily_train.fixtures.models import build_model

    family = setting.split("-")[1]
    task = "classification" if family == "cls" else "sft"
    rng = random.Random(f"row-agreement/{setting}")
    make = _cls_rows if family == "cls" else _scraped_sft_rows
    paths = {split: write_jsonl(work / "data" / f"{split}.jsonl", make(n, rng, 0.2, split))
             for split, n in SIZES[family].items()}
    model = build_model("bert" if family == "cls" else "llama", work / "model")
    return _config(task, model, paths, 1000, 4)


def _example_config(setting: str, work: Path, sft_steps: int) -> dict:
    """The demo's own train.yaml (``verifily demo --task <task>``: the shipped data stored as ds_demo_<task>@v1)."""
    import yaml

    from verifily_train.cli.demo import prepare_demo

    task = "classification" if setting == "example-cls" else "sft"
    cfg = yaml.safe_load(prepare_demo(task, home=work / "home").read_text())
    cfg["training"]["attribution_snapshots"] = 4
    cfg.setdefault("runtime", {})["progress"] = False
    if task == "sft":
        cfg["training"]["max_steps"] = sft_steps
        cfg["eval"].update(metrics=["loss"], baseline=False, bootstrap_samples=0)
    return cfg


def _run_hashes(run: Path) -> dict:
    """What identifies the trained Run across calls (no timestamps): its config, data and reproducibility hashes."""
    record = json.loads((run / "run.json").read_text())
    return {k: record.get(k) for k in ("config_hash", "data_hash", "model_identity", "reproducibility_hash")}


def _tracin_on_slice(run: str, value: str, verdict: str, verdict_slice: str, work: Path, env: dict) -> dict:
    """TracIn against the verdict's own slice (the test rows without the value): the one target-dependent score;
    the loss-type scores read no target, so their excess is the same on every target."""
    import pandas as pd

    from verifily_train.attribution.rows import summarize_by_tag

    target = f"slice:{verdict_slice}"
    sliced = _json(_cli("attribute", run, "--rows", "--target", target, "--methods", "tracin", "--json",
                        cwd=work, env=env))
    frame = pd.read_parquet(Path(sliced["path"]) / "row_attribution.parquet")
    e = {x["value"]: x for x in summarize_by_tag(frame, "tracin", "source")}[value]
    return {"target": target, "target_rows": sliced.get("target_rows"), "method": "tracin",
            "excess": e["excess"], "excess_ci95": e.get("excess_ci95"),
            "agrees": (e["excess"] > 0) == (verdict == "hurts")}


def _setup(setting: str, sft_steps: int, root: Path):
    """The setting's data, model and train.yaml under ``root/setting``, and ``verifily train`` on them."""
    import yaml

    work = root / setting
    work.mkdir(parents=True, exist_ok=True)  # --root of an earlier call: its cache entries are hits
    env = dict(os.environ, VERIFILY_HOME=str(work / "home"), HF_HUB_OFFLINE="1")
    os.environ.update(VERIFILY_HOME=str(work / "home"), HF_HUB_OFFLINE="1")
    cfg = _fixture_config(setting, work) if setting.startswith("fixture") else _example_config(setting, work, sft_steps)
    (work / "train.yaml").write_text(yaml.safe_dump(cfg))
    trained = _cli("train", "-c", "train.yaml", cwd=work, env=env)
    run = next(line.split("run:", 1)[1].strip() for line in trained.stdout.splitlines() if line.strip().startswith("run:"))
    return work, env, run


def slice_check(saved: dict, sft_steps: int, root: Path) -> dict:
    """``--slice-check``: the last column alone for a setting whose verdicts are saved. Retrains the Run from the
    same config (training is deterministic: a full re-run of fixture-cls reproduced every verdict digit) and runs
    TracIn on each significant verdict's slice; the saved verdicts and whole-split excesses are kept as they are."""
    started = time.perf_counter()
    work, env, run = _setup(saved["setting"], sft_steps, root)
    for value, e in saved["values"].items():
        # the slice attribute --by reads a verdict on (attribution/analysis.py): the test rows without the value,
        # whenever some test row lacks it (every setting here); older records did not store it
        e.setdefault("verdict_slice", f"source!={value}")
        if e["verdict"] in ("hurts", "helps") and e["verdict_slice"] != "overall":
            e["tracin_on_verdict_slice"] = dict(_tracin_on_slice(run, value, e["verdict"], e["verdict_slice"], work, env),
                                                run=run, run_hashes=_run_hashes(work / run), retrained_run=True)
        else:
            e.setdefault("tracin_on_verdict_slice", None)
    saved["slice_check_seconds"] = round(time.perf_counter() - started, 1)
    return saved


def run_setting(setting: str, seeds: int, sft_steps: int, root: Path) -> dict:
    import pandas as pd

    from verifily_train.attribution.rows import summarize_by_tag

    started = time.perf_counter()
    work, env, run = _setup(setting, sft_steps, root)
    tagged = _json(_cli("attribute", run, "--by", "source", "--seeds", str(seeds), "--json", cwd=work, env=env))
    tag_seconds = time.perf_counter() - started
    rows_started = time.perf_counter()
    rows = _json(_cli("attribute", run, "--rows", "--methods", "all", "--json", cwd=work, env=env))
    rows_seconds = time.perf_counter() - rows_started
    table = pd.read_parquet(Path(rows["path"]) / "row_attribution.parquet")
    methods = sorted(c[len("score_"):] for c in table.columns if c.startswith("score_"))
    sums = {m: {e["value"]: e for e in summarize_by_tag(table, m, "source")} for m in methods}
    values = {}
    for value, entry in tagged["values"].items():
        cell = entry["slices"][entry["verdict_slice"]]["loss"]
        verdict = entry["verdict"]
        significant = verdict in ("hurts", "helps")
        on_slice = (_tracin_on_slice(run, value, verdict, entry["verdict_slice"], work, env)
                    if significant and entry["verdict_slice"] != "overall" else None)
        values[value] = {
            "verdict": verdict, "p_adjusted": entry["p_adjusted"], "effect_vs_random": cell["effect"],
            "seed_ci95": cell.get("ci95") or cell.get("seed_ci95"), "mde": cell["mde"], "removed_rows": entry["removed_rows"],
            "excess": {m: sums[m][value]["excess"] for m in methods if value in sums[m]},
            "excess_ci95": {m: sums[m][value].get("excess_ci95") for m in methods if value in sums[m]},
            "agrees": ({m: (sums[m][value]["excess"] > 0) == (verdict == "hurts") for m in methods if value in sums[m]}
                       if significant else None),
            "verdict_slice": entry["verdict_slice"], "tracin_on_verdict_slice": on_slice,
            "target": tagged.get("target", {}).get("name"), "why": entry.get("why"),
            "per_seed": cell.get("per_seed"), "removal_per_seed": cell.get("removal_per_seed"),
            "random_per_seed": cell.get("random_per_seed")}
    return {"setting": setting, "seeds": seeds, "correction": tagged.get("correction"), "run": run,
            "default_method": rows["default_method"], "methods": methods, "values": values,
            "train_rows": len(table), "seconds": round(time.perf_counter() - started, 1),
            "tag_level_seconds": round(tag_seconds, 1), "rows_all_seconds": round(rows_seconds, 1),
            "run_hashes": _run_hashes(work / run)}


def summarize(results: List[dict]) -> dict:
    methods = sorted({m for r in results for m in r["methods"]})
    out = {}
    for method in methods:
        calls = [(r["setting"], v, e["verdict"], e["agrees"][method]) for r in results for v, e in r["values"].items()
                 if e["agrees"] is not None and method in e["agrees"]]
        out[method] = {"significant_verdicts": len(calls), "agree": sum(a for *_, a in calls),
                       "disagreements": [f"{s}:{v} ({verdict})" for s, v, verdict, a in calls if not a]}
    sliced = [(r["setting"], v, e["verdict"], e["tracin_on_verdict_slice"]["agrees"]) for r in results
              for v, e in r["values"].items() if e.get("tracin_on_verdict_slice")]
    if sliced:
        out["tracin_on_verdict_slice"] = {
            "significant_verdicts": len(sliced), "agree": sum(a for *_, a in sliced),
            "disagreements": [f"{s}:{v} ({verdict})" for s, v, verdict, a in sliced if not a]}
    return out


def render(record: dict) -> str:
    """The markdown table of docs/attribution.md: every value, its verdict, each method's excess sign."""
    methods = sorted({m for r in record["settings"] for m in r["methods"]})
    head = ["setting", "value (rows removed)", "verdict (Holm; seeds)", "effect vs random removal [seed 95% CI]"]
    lines = ["| " + " | ".join(head + [f"`{m}` excess [95% CI]" for m in methods]) + " |",
             "|" + "---|" * (len(head) + len(methods))]
    lines[0] = lines[0][:-2] + " | `tracin` excess on the verdict's slice (`--target slice:source!=v`) |"
    lines[1] += "---|"
    for r in record["settings"]:
        for value, e in r["values"].items():
            verdict = e["verdict"] if e["verdict"] in ("hurts", "helps") else "none"
            cells = [r["setting"], f"{value} ({e['removed_rows']})", f"**{verdict}** (p_adj {e['p_adjusted']:.2g}; {r['seeds']})",
                     f"{e['effect_vs_random']:+.4f} [{e['seed_ci95'][0]:+.4f}, {e['seed_ci95'][1]:+.4f}]"]
            for m in methods:
                if m not in e["excess"]:
                    cells.append("-")
                    continue
                ci = e["excess_ci95"].get(m)
                mark = "" if e["agrees"] is None else (" ✓" if e["agrees"][m] else " ✗")
                cells.append(f"{e['excess'][m]:+.3g}" + (f" [{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else "") + mark)
            sliced = e.get("tracin_on_verdict_slice")
            if sliced:
                ci = sliced.get("excess_ci95")
                cells.append(f"{sliced['excess']:+.3g}" + (f" [{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else "")
                             + (" ✓" if sliced["agrees"] else " ✗"))
            else:
                cells.append("-" if e["agrees"] is None or "tracin_on_verdict_slice" in e else "not measured")
            lines.append("| " + " | ".join(cells) + " |")
    summary = "; ".join(f"`{m}` {v['agree']}/{v['significant_verdicts']}" for m, v in record["summary"].items())
    return "\n".join(lines) + f"\n\nSign agreement with the significant verdicts: {summary}.\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--seeds", type=int, default=8, help="seeds per arm of the tag-level verdicts (default 8)")
    parser.add_argument("--sft-steps", type=int, default=40, help="training.max_steps of example-sft (default 40)")
    parser.add_argument("--root", default=None,
                        help="work folder (default: a new temporary one); an earlier call's folder reuses its cache")
    parser.add_argument("--slice-check", action="store_true",
                        help="keep the saved verdicts and excesses; retrain each setting's Run and add only TracIn "
                             "on each significant verdict's slice (the table's last column)")
    parser.add_argument("--render", action="store_true", help="only print the markdown table of the saved results")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(RESULTS.read_text())))
        return 0
    chosen = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="row-agreement-"))
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    done: Dict[str, dict] = {r["setting"]: r for r in previous.get("settings", [])}
    for setting in chosen:
        if args.slice_check:
            if setting not in done:
                parser.error(f"--slice-check: no saved verdicts for {setting} in {RESULTS}")
            result = slice_check(done[setting], args.sft_steps, root)
        else:
            result = run_setting(setting, args.seeds, args.sft_steps, root)
        done[setting] = result
        for value, e in result["values"].items():
            excess = ", ".join(f"{m} {x:+.3g}" for m, x in e["excess"].items())
            print(f"{setting} source={value}: {e['verdict']} (p_adj {e['p_adjusted']:.3g}, effect vs random "
                  f"{e['effect_vs_random']:+.4f}); excess: {excess}; agrees: {e['agrees']}", flush=True)
        results = [done[s] for s in SETTINGS if s in done]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"settings": results, "summary": summarize(results)}, indent=2, sort_keys=True) + "\n")
    print(json.dumps(summarize([done[s] for s in SETTINGS if s in done]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
