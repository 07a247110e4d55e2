"""kill -9 at a point inside each stage: the re-run completes, reuses finished stages, and its artifact equals
an uninterrupted run's; the killed run leaves no process behind."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import cli_env, printed_run, write_config

pytestmark = pytest.mark.slow
STAGES = ["validate", "tokenize", "train", "evaluate", "baseline", "slice", "hard_examples", "write_artifact"]
# One kill timing (seed) per stage, alternating, to keep the suite's time down; the train stage gets both: seed 0
# is killed in a pause after it computed, seed 1 in the middle of training.
KILLS = [(stage, i % 2) for i, stage in enumerate(STAGES)] + [("train", 1 - STAGES.index("train") % 2)]
FAST = {"training": {"num_epochs": 3, "save_steps": 4, "eval_steps": 1000}, "eval": {"bootstrap_samples": 200}}


def _start(folder: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml"],
                            cwd=folder, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _rerun(folder: Path, env: dict) -> Path:
    result = subprocess.run([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml"],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return printed_run(result, folder)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models, prefect_api):
    """An uninterrupted run (cache off) on the same data and config."""
    from verifily_train.fixtures.data import write_splits

    root = tmp_path_factory.mktemp("crash-reference")
    splits = write_splits(root / "data", "sft", {"train": 32, "val": 8, "test": 16}, seed=9)
    write_config(root, "sft", models["llama"], splits, **FAST)
    env = cli_env({"PREFECT_API_URL": prefect_api, "VERIFILY_HOME": str(root / "home")})
    result = subprocess.run([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml",
                             "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return splits, next((root / "runs").glob("run_*"))


@pytest.mark.parametrize("stage, seed", KILLS, ids=[f"{s}-seed{n}" for s, n in KILLS])
def test_kill_inside_a_stage_then_rerun_equals_uninterrupted(stage, seed, reference, tmp_path, models, prefect_api,
                                                            verifily_home):
    splits, ref_run = reference
    write_config(tmp_path, "sft", models["llama"], splits, **FAST)
    rng = random.Random(f"{stage}-{seed}")
    env = cli_env({"PREFECT_API_URL": prefect_api})
    mid_compute = stage in ("train", "write_artifact") and seed == 1 or stage == "write_artifact"
    if not mid_compute:
        # most stages take milliseconds on the fixtures: a pause after the stage computed, before its entry is
        # published, gives the kill a window inside the stage; train (seed 1) is killed mid-training instead
        env["VERIFILY_PAUSE_STAGE"] = f"{stage}:3"
    proc = _start(tmp_path, env)
    marker = (lambda: list((tmp_path / "runs").glob(".staging-*"))) if stage == "write_artifact" else \
        (lambda: list((verifily_home / "cache" / stage).glob(".tmp-*")))
    deadline = time.time() + 240
    while time.time() < deadline and not marker() and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the stage could be interrupted"
    time.sleep(rng.uniform(0.0, 0.3) if mid_compute else rng.uniform(0.2, 2.5))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    claimed = [p for p in (tmp_path / "runs").glob("run_*/checksums.sha256")] if (tmp_path / "runs").exists() else []
    run = _rerun(tmp_path, cli_env({"PREFECT_API_URL": prefect_api}))
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed"
    before = STAGES[:STAGES.index(stage)]
    reused = [s for s in before if s in record["stages"] and record["stages"][s]["cache_hit"]]
    assert reused == [s for s in before if s in record["stages"]], (stage, record["stages"])
    assert (run / "adapter/adapter_model.safetensors").read_bytes() == \
           (ref_run / "adapter/adapter_model.safetensors").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(run / "predictions.parquet"),
                                  pd.read_parquet(ref_run / "predictions.parquet"))
    assert json.loads((run / "metrics.json").read_text())["eval"] == json.loads((ref_run / "metrics.json").read_text())["eval"]
    assert subprocess.run([sys.executable, "-m", "verifily_train.cli.main", "runs", "verify", str(run)],
                          capture_output=True).returncode == 0
    assert len(claimed) <= 1  # a kill after the rename may leave one complete, verifiable run: never a torn one
    for c in claimed:
        assert subprocess.run([sys.executable, "-m", "verifily_train.cli.main", "runs", "verify", str(c.parent)],
                              capture_output=True).returncode == 0


def _children(pid: int) -> list:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def test_killed_run_leaves_no_prefect_server_behind(tmp_path, models, sft_splits):
    """Without PREFECT_API_URL a temporary server child is started; kill -9 of the parent alone must end it."""
    write_config(tmp_path, "sft", models["llama"], sft_splits, training={"num_epochs": 200})
    env = cli_env()
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    children = []
    while time.time() < deadline and not children:
        children = _children(proc.pid)
        time.sleep(0.2)
    assert children, "no temporary server was started"
    time.sleep(2)
    proc.kill()  # SIGKILL the parent only, as an OOM kill would
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(c) for c in children):
        time.sleep(0.2)
    leaked = [c for c in children if _alive(c)]
    for c in leaked:
        os.kill(c, signal.SIGKILL)  # clean up before failing
    assert not leaked, f"processes outlived the killed run: {leaked}"
