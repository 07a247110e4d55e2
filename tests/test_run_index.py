"""Runs findable from anywhere: each published (or failed) Run's folder is named in $VERIFILY_HOME/runs-index, so a
run id resolves in runs list/show, compare and attribute whatever the working folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from conftest import assert_user_error, run_cli
from verifily_train.artifacts.run import find_run, index_dir, list_runs, publish_run, write_failed_run


def _publish(runs_dir: Path, run_id: str, seed: int) -> Path:
    """A minimal completed SFT Run, published the way the pipeline publishes one."""
    staging = runs_dir / f".staging-{run_id}"
    staging.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n = 24
    pd.DataFrame({"example_id": [f"test:{i}" for i in range(n)], "row_hash": [f"h{i}" for i in range(n)],
                  "tag.source": ["human", "web"] * (n // 2), "loss_sum": rng.gamma(4.0, 0.5, n) * 5,
                  "n_tokens": [5] * n, "exact_match": (rng.random(n) < 0.5).astype(float),
                  "token_f1": rng.random(n), "format_ok": [1.0] * n}).to_parquet(staging / "predictions.parquet")
    (staging / "run.json").write_text(json.dumps({
        "run_id": run_id, "status": "completed", "started_at": f"2026-12-0{seed}T00:00:00Z",
        "metrics": {"loss": 1.0}, "job": {"task": "sft", "base_model": "org/m", "dataset_version": {"ref": "ds@v1"},
                                          "config": {"seed": seed}}}))
    return publish_run(staging, runs_dir / run_id)


def test_a_run_made_in_another_folder_resolves_by_id_everywhere(tmp_path, verifily_home):
    made = _publish(tmp_path / "project-a" / "runs", "run_a1", 1)
    other = _publish(tmp_path / "project-b" / "runs", "run_b1", 2)
    entry = json.loads((index_dir() / "run_a1.json").read_text())
    assert entry == {"run_id": "run_a1", "path": str(made.resolve())}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import os

    here = os.getcwd()
    os.chdir(elsewhere)
    try:
        assert find_run("run_a1").resolve() == made.resolve()
        assert {r["run_id"] for r in list_runs()} >= {"run_a1", "run_b1"}
    finally:
        os.chdir(here)
    shown = run_cli("runs", "show", "run_a1", "--json", cwd=elsewhere)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["run_id"] == "run_a1"
    listed = run_cli("runs", "list", cwd=elsewhere)
    assert "run_a1" in listed.stdout and "run_b1" in listed.stdout
    compared = run_cli("compare", "run_a1", "run_b1", "--permutations", "99", "--bootstrap-samples", "20",
                       cwd=elsewhere)
    assert compared.returncode == 0, compared.stderr
    assert "A: run_a1" in compared.stdout and "B: run_b1" in compared.stdout
    # an explicit --runs-dir is where the id is looked up, and only there
    result = run_cli("runs", "show", "run_a1", "--runs-dir", str(tmp_path / "project-b" / "runs"), cwd=elsewhere)
    assert_user_error(result, "run_a1", "no such run")
    assert other.exists()


def test_a_moved_run_is_not_found_through_a_stale_index_entry_and_failed_runs_are_indexed(tmp_path, verifily_home):
    made = _publish(tmp_path / "runs", "run_gone", 1)
    os_rename_target = tmp_path / "moved"
    made.rename(os_rename_target)
    result = run_cli("runs", "show", "run_gone", cwd=tmp_path / "runs")
    assert_user_error(result, "run_gone", "no such run", "the run index")
    failed = write_failed_run(tmp_path / "runs", "run_failed", {"job": {"task": "sft"}}, RuntimeError("boom"))
    assert json.loads((index_dir() / "run_failed.json").read_text())["path"] == str(failed.resolve())


def test_attribute_takes_runs_dir(tmp_path):
    result = run_cli("attribute", "run_nowhere", "--runs-dir", str(tmp_path / "mine"), "--dry-run", cwd=tmp_path)
    assert_user_error(result, "run_nowhere", f"looked in {tmp_path / 'mine'}/")
