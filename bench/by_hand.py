"""The pipeline's stages called by hand, in order, with no Prefect and no cache: the baseline for suite 2.

``python -m bench.by_hand train.yaml RUNS_DIR`` does what ``verifily train -c train.yaml`` does (fingerprint,
validate, tokenize, train, evaluate, baseline, slice, hard examples, write the Run) in one process.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def main(config: str, runs_dir: str) -> None:
    from verifily_train.pipeline import stages
    from verifily_train.artifacts.run import new_run_id, utc_now
    from verifily_train.config import load_config

    cfg = load_config(config)
    started_at, clock = utc_now(), time.time()
    root = Path(tempfile.mkdtemp(prefix="by-hand-"))

    def folder(name: str) -> Path:
        path = root / name
        path.mkdir()
        return path

    def run(name, fn, *args):
        out = folder(name)
        manifest = fn(*args, out, root / f"work-{name}")
        return dict(manifest, dir=str(out))

    fp = stages.fingerprint_stage(cfg, root / "cache")
    validated = run("validate", stages.validate_stage, cfg, fp)
    tokenized = run("tokenize", stages.tokenize_stage, cfg, fp)
    trained = run("train", stages.train_stage, cfg, fp, tokenized)
    evaluated = run("evaluate", stages.evaluate_stage, cfg, fp, tokenized, trained)
    baseline = run("baseline", stages.baseline_stage, cfg, fp, tokenized)
    sliced = run("slice", stages.slice_stage, cfg, tokenized, evaluated, baseline)
    hard = run("hard", stages.hard_examples_stage, cfg, evaluated)
    stages.write_artifact_stage(cfg, new_run_id(), started_at, clock, fp, validated, tokenized, trained, evaluated,
                                baseline, sliced, hard, Path(runs_dir))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
