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
    from verifily_train.artifacts.record import RunStart
    from verifily_train.artifacts.run import new_run_id, utc_now
    from verifily_train.config import load_config
    from verifily_train.pipeline.fingerprint import fingerprint_stage
    from verifily_train.pipeline.runner import STAGES, run_uncached, write_run

    cfg = load_config(config)
    start = RunStart(new_run_id(), utc_now(), time.time())
    root = Path(tempfile.mkdtemp(prefix="by-hand-"))
    fp = fingerprint_stage(cfg, root / "cache")
    done = {}
    for stage in STAGES:  # in the flow's order, each into its own folder, no cache
        out = root / stage.name
        out.mkdir()
        done[stage.name] = dict(run_uncached(stage.name, cfg, fp, out, root / f"work-{stage.name}", **done),
                                dir=str(out))
    write_run(cfg, start, fp, done, Path(runs_dir))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
