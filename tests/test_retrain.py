"""Retraining claims: one training per (dataset version, training config), whichever path sees it first."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from verifily_train.pipeline import claims as retrain
from verifily_train.config import load_config
from verifily_train.errors import ConfigError


def _cfg(*overrides):
    return load_config(None, ["task=sft", "base_model=some/model", *overrides])


def test_training_config_hash_ignores_the_dataset_but_not_training_settings():
    a = retrain.training_config_hash(_cfg("dataset_version=ds_x@v1"))
    assert a == retrain.training_config_hash(_cfg("dataset_version=ds_x@v2"))
    assert a == retrain.training_config_hash(_cfg("dataset_version=ds_x@v2", "output.dir=elsewhere"))
    assert a != retrain.training_config_hash(_cfg("dataset_version=ds_x@v2", "lora.r=8"))


def test_training_config_without_dataset_loads_but_other_problems_raise():
    cfg = retrain.load_training_config(None, ["task=sft", "base_model=m"])
    assert cfg.dataset_version is None
    with pytest.raises(ConfigError, match="lora.r"):
        retrain.load_training_config(None, ["task=sft", "base_model=m", "lora.r=0"])


def _take(args):
    home, key, owner = args
    return owner if retrain.claim(key, {"owner": owner}, Path(home)) is None else None


def test_exactly_one_of_many_concurrent_claimants_wins(tmp_path):
    key = retrain.claim_key("sha256:data", "cfg")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        winners = [w for w in pool.map(_take, [(str(tmp_path), key, f"owner-{i}") for i in range(16)]) if w]
    assert len(winners) == 1
    assert retrain.read_claim(key, tmp_path)["owner"] == winners[0]


def test_failed_run_releases_its_claim_and_completed_runs_are_never_pending(tmp_path):
    from verifily_train.dataset.store import create_version
    from verifily_train.fixtures.data import write_splits

    for version, seed in (("v1", 1), ("v2", 2)):
        s = write_splits(tmp_path / version, "sft", {"train": 8, "test": 4}, seed=seed)
        create_version("ds_a", version, "sft", str(s["train"]), test=str(s["test"]), home=tmp_path)
    versions = retrain.pending_versions("cfg", "sft", latest_only=False, home=tmp_path)
    assert [v["ref"] for v in versions] == ["ds_a@v1", "ds_a@v2"]
    assert [v["ref"] for v in retrain.pending_versions("cfg", "sft", home=tmp_path)] == ["ds_a@v2"]
    assert retrain.pending_versions("cfg", "classification", home=tmp_path) == []

    v1, v2 = versions
    k1, k2 = (retrain.claim_key(v["content_hash"], "cfg") for v in versions)
    assert retrain.claim(k2, {"owner": "a"}, tmp_path) is None
    assert retrain.claim(k2, {"owner": "b"}, tmp_path)["owner"] == "a"  # taken: b skips
    retrain.release(k2, "b", tmp_path)  # not b's to release
    assert retrain.read_claim(k2, tmp_path)["owner"] == "a"
    retrain.release(k2, "a", tmp_path)  # a's run failed: the version may be trained again
    assert [v["ref"] for v in retrain.pending_versions("cfg", "sft", home=tmp_path)] == ["ds_a@v2"]

    run1 = tmp_path / "runs" / "run_1"
    run1.mkdir(parents=True)
    retrain.complete(k1, {"run_path": str(run1), "dataset_id": "ds_a", "dataset_created_at": v1["created_at"],
                          "dataset_version": "v1", "training_config_hash": "cfg"}, tmp_path)
    assert [v["ref"] for v in retrain.pending_versions("cfg", "sft", latest_only=False, home=tmp_path)] == ["ds_a@v2"]
    assert retrain.previous_run("cfg", "ds_a", v2["created_at"], "v2", tmp_path)["run_path"] == str(run1)
    assert retrain.previous_run("other", "ds_a", v2["created_at"], "v2", tmp_path) is None
    assert retrain.previous_run("cfg", "ds_a", v1["created_at"], "v1", tmp_path) is None


def test_a_claim_left_by_a_killed_process_is_taken_over(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    key = retrain.claim_key("sha256:data", "cfg")
    code = ("import sys, time; from pathlib import Path; from verifily_train.pipeline import claims as retrain; "
            f"retrain.claim({key!r}, {{'owner': 'doomed'}}, Path({str(tmp_path)!r})); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert retrain.claim(key, {"owner": "me"}, tmp_path)["owner"] == "doomed"  # alive: it keeps its claim
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert retrain.claim(key, {"owner": "me"}, tmp_path) is None  # dead: the version can be trained again
    assert retrain.read_claim(key, tmp_path)["owner"] == "me"
