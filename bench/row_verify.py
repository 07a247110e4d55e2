"""``verifily attribute RUN --rows --verify K`` on planted errors, through the CLI: does removing the flagged rows help?

A tiny BERT classification Run on 200 train rows with a share of them relabelled at random (the planted
errors of ``bench/row_attribution.py``), then the whole user path: ``verifily train``, ``verifily attribute RUN
--rows --verify K --seeds N`` (retrains without the top-K rows by the default score and without K random
rows, a fresh draw per seed, and tests the per-seed difference). Prints the verdict line and writes
bench/results/row-verify.json.

    python -m bench.row_verify [--share 0.2] [--k 40] [--seeds 5]
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

from bench.row_attribution import SIZES, _cls_rows, _config

RESULTS = Path(__file__).resolve().parent / "results" / "row-verify.json"


def _cli(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "verifily_train.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"verifily {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def main(argv=None) -> int:
    import yaml

    from verifily_train.fixtures.data import write_jsonl
    from verifily_train.fixtures.models import build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, default=0.2, help="share of train rows relabelled (default 0.2)")
    parser.add_argument("--k", type=int, default=40, help="rows removed by --verify (default 40)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm (default 5)")
    parser.add_argument("--trial", type=int, default=0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="row-verify-"))
    env = dict(os.environ, VERIFILY_HOME=str(work / "home"), HF_HUB_OFFLINE="1")
    rng = random.Random(f"rows/cls-{args.share}/{args.trial}")
    paths = {split: write_jsonl(work / "data" / f"{split}.jsonl", _cls_rows(n, rng, args.share, split))
             for split, n in SIZES["cls"].items()}
    model = build_model("bert", work / "bert")
    (work / "train.yaml").write_text(yaml.safe_dump(_config("classification", model, paths, 1000 + args.trial, 4)))
    started = time.perf_counter()
    trained = _cli("train", "-c", "train.yaml", cwd=work, env=env)
    run = next(line.split("run:", 1)[1].strip() for line in trained.stdout.splitlines() if line.strip().startswith("run:"))
    attributed = _cli("attribute", run, "--rows", "--verify", str(args.k), "--seeds", str(args.seeds), "--json",
                      cwd=work, env=env)
    result = json.loads(attributed.stdout[attributed.stdout.index("{"):])
    verify = result.get("verify") or {}
    out = {"share": args.share, "k": args.k, "seeds": args.seeds, "trial": args.trial,
           "default_method": result.get("default_method"), "verify": verify,
           "planted_in_top_k": _planted_in_top(result, work, args.k),
           "seconds": round(time.perf_counter() - started, 1)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def _planted_in_top(result: dict, work: Path, k: int):
    """How many of the top-K rows (by the default score) were planted errors."""
    import pandas as pd

    folder = result.get("path")
    if not folder:
        return None
    table = pd.read_parquet(Path(folder) / "row_attribution.parquet")
    method = result.get("default_method") or "loss"
    top = table.sort_values(f"rank_{method}").head(k)
    return int(sum(json.loads(t).get("planted") == "yes" for t in top["tags"]))


if __name__ == "__main__":
    sys.exit(main())
