"""A real Run from the pipeline's stage functions in this process (no Prefect): for benches and tests.

Every stage goes through ``pipeline.cache.run_cached`` under a key made of the stage name and the
config and data hashes, so the Run's ``run.json`` names cache entries the way a flow run's does.
"""

from __future__ import annotations

import time
from pathlib import Path


def train_run(config_path: Path, cache_root: Path, runs_dir: Path) -> Path:
    """Run every stage of ``verifily train`` for ``config_path`` in-process; returns the Run folder."""
    from verifily_train.config import load_config
    from verifily_train.hashing import content_hash
    from verifily_train.pipeline import stages
    from verifily_train.pipeline.cache import CacheMode, run_cached

    cfg = load_config(str(config_path))
    started_clock = time.time()
    fp = stages.fingerprint_stage(cfg, cache_root)
    mode = CacheMode(read=True, write=True)

    def stage(name, compute):
        key = content_hash("inprocess", name, fp["config_hash"], fp["data_hash"], fp["model_identity"])
        return run_cached(name, key, cache_root, mode, compute)

    validated = stage("validate", lambda out, work: stages.validate_stage(cfg, fp, out, work))
    tokenized = stage("tokenize", lambda out, work: stages.tokenize_stage(cfg, fp, out, work))
    trained = stage("train", lambda out, work: stages.train_stage(cfg, fp, tokenized, out, work))
    evaluated = stage("evaluate", lambda out, work: stages.evaluate_stage(cfg, fp, tokenized, trained, out, work))
    baseline = stage("baseline", lambda out, work: stages.baseline_stage(cfg, fp, tokenized, out, work))
    sliced = stage("slice", lambda out, work: stages.slice_stage(cfg, tokenized, evaluated, baseline, out, work))
    hard = stage("hard_examples", lambda out, work: stages.hard_examples_stage(cfg, evaluated, out, work))
    run_id = "run_" + content_hash(fp["config_hash"], fp["data_hash"])[:12]
    written = stages.write_artifact_stage(cfg, run_id, "2026-01-01T00:00:00Z", started_clock, fp, validated,
                                          tokenized, trained, evaluated, baseline, sliced, hard, Path(runs_dir))
    return Path(written["path"])
