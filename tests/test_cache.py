"""Stage caching and crash resume: what each change re-runs, corrupted entries, kills, concurrency."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from conftest import cli_env, printed_run, run_cli, train, write_config, write_sft_splits

pytestmark = pytest.mark.slow
STAGES = ["validate", "tokenize", "train", "evaluate", "baseline", "slice", "hard_examples"]


def ran(run: Path) -> list:
    """The stages that computed (were not cache hits) in a run."""
    stages = json.loads((run / "run.json").read_text())["stages"]
    assert set(stages) == set(STAGES)
    return [name for name in STAGES if not stages[name]["cache_hit"]]


def ok(result):
    assert result[0].returncode == 0, result[0].stderr[-3000:]
    return result[1]


@dataclass
class Cold:
    """A project folder after its first run: config, data, runs/ and its own VERIFILY_HOME (cache, store)."""
    folder: Path
    run: Path
    splits: dict
    home: Path

    def __iter__(self):
        return iter((self.folder, self.run))


@pytest.fixture(scope="module")
def cold_snapshot(tmp_path_factory, models, prefect_api):
    """One first, uncached run for the whole module, then a copy of its folder to restore before each test."""
    root = tmp_path_factory.mktemp("cold")
    folder = root / "project"
    splits = write_sft_splits(folder)
    write_config(folder, "sft", models["llama"], splits)
    env = cli_env({"PREFECT_API_URL": prefect_api, "VERIFILY_HOME": str(folder / "home")})
    result = run_cli("train", "-c", "train.yaml", cwd=folder, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = (folder / "runs").glob("run_*")
    assert ran(run) == STAGES
    shutil.copytree(folder, root / "snapshot", symlinks=True)
    return Cold(folder, run, splits, folder / "home"), root / "snapshot"


@pytest.fixture
def cold(cold_snapshot, monkeypatch):
    """The module's first run, restored at its own absolute path (the config names its data by path, so a
    re-run sees exactly the first run's inputs) with a fresh copy of its cache; VERIFILY_HOME points there."""
    first, snapshot = cold_snapshot
    shutil.rmtree(first.folder)
    shutil.copytree(snapshot, first.folder, symlinks=True)
    monkeypatch.setenv("VERIFILY_HOME", str(first.home))
    return first


def test_identical_rerun_is_all_cache_hits_with_equal_content(cold, prefect_api):
    folder, first = cold
    result = train(folder, prefect_api)
    second = ok(result)
    assert ran(second) == []
    assert "validate cached" in result[0].stdout and "train cached" in result[0].stdout
    for name in ("adapter/adapter_model.safetensors", "predictions.parquet", "slices.json", "hard_examples.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert json.loads((first / "metrics.json").read_text())["eval"] == json.loads((second / "metrics.json").read_text())["eval"]
    assert run_cli("runs", "verify", second.name, cwd=folder).returncode == 0


def test_identical_rerun_is_replayed_without_torch_transformers_or_prefect(cold, prefect_api):
    """A re-run with every input unchanged writes a new, verifiable Run from the cache and loads nothing heavy;
    ``--flow`` or another device environment goes through the flow."""
    folder, first = cold
    probe = ("import sys; from verifily_train.cli.main import main; code = main(['train', '-c', 'train.yaml']); "
             "print('heavy:', sorted(m for m in ('torch', 'transformers', 'prefect', 'matplotlib') if m in sys.modules)); "
             "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=folder, capture_output=True, text=True, timeout=300,
                            env=cli_env({"PREFECT_API_URL": prefect_api}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replayed:" in result.stdout and "heavy: []" in result.stdout, result.stdout
    second = printed_run(result, folder)
    assert second != first and ran(second) == []
    a, b = (json.loads((run / "run.json").read_text()) for run in (first, second))
    for key in ("reproducibility_hash", "config_hash", "data_hash", "env_hash", "model_identity", "metrics",
                "precision", "evaluation", "hard_examples_headline", "warnings"):
        assert a[key] == b[key], key
    assert {k: v["key"] for k, v in a["stages"].items()} == {k: v["key"] for k, v in b["stages"].items()}
    for name in ("adapter/adapter_model.safetensors", "predictions.parquet", "slices.json", "hard_examples.jsonl",
                 "trainer_log.jsonl", "data_rows.parquet", "env.json", "metrics.json", "config.yaml"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert run_cli("runs", "verify", second.name, cwd=folder).returncode == 0
    # --flow always makes a flow run; a changed device environment is another replay key (the flow then
    # decides the device again), though every stage still hits the cache here (still the CPU)
    for extra, env in ((("--flow",), {}), ((), {"CUDA_VISIBLE_DEVICES": ""})):
        result = run_cli("train", "-c", "train.yaml", *extra, cwd=folder,
                         env=cli_env({"PREFECT_API_URL": prefect_api, **env}))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "replayed:" not in result.stdout, (extra, env)
        assert ran(printed_run(result, folder)) == []


@pytest.mark.parametrize("override, expected", [
    # Downstream keys hash the upstream stage's *output*: when a recomputed stage writes identical
    # bytes (a new eval batch size, no row long enough to truncate), later stages are reused.
    ("eval.batch_size=5", ["evaluate", "baseline"]),  # + slice if the predictions' bytes changed (see below)
    ("eval.hard_examples=5", ["hard_examples"]),
    ("eval.slice_by_tags=[difficulty]", ["validate", "slice", "hard_examples"]),
    ("lora.r=8", ["train", "evaluate", "slice", "hard_examples"]),
    ("training.max_seq_length=24", ["tokenize", "train", "evaluate", "baseline", "slice", "hard_examples"]),
    ("prompt.template=Q: {instruction} {input} A:", ["tokenize", "train", "evaluate", "baseline", "slice",
                                                      "hard_examples"]),
    ("runtime.progress=false", []),
])
def test_a_change_reruns_exactly_the_stages_that_read_it(cold, prefect_api, override, expected):
    folder, first = cold
    run = ok(train(folder, prefect_api, override))
    if override.startswith("eval.batch_size"):
        # Another batch size pads the prompts differently. With attention in fp32 (CPU bf16) the predictions
        # came out byte-identical here, so slice (keyed by their hashes) was reused; where they differ it re-runs.
        keys = [json.loads((r / "run.json").read_text())["stages"]["slice"]["key"] for r in (first, run)]
        expected = expected + (["slice"] if keys[0] != keys[1] else [])
    assert ran(run) == expected


def test_one_changed_data_byte_invalidates_every_stage(cold, prefect_api):
    folder, _ = cold
    path = cold.splits["test"]
    path.write_bytes(path.read_bytes().replace(b"human", b"synthetic", 1))
    assert ran(ok(train(folder, prefect_api))) == STAGES


def test_same_bytes_at_another_path_hit_the_cache(cold, prefect_api, models, tmp_path):
    folder, _ = cold
    moved = tmp_path / "moved"
    shutil.copytree(folder / "sft-data", moved)
    elsewhere = tmp_path / "other-project"
    elsewhere.mkdir()
    write_config(elsewhere, "sft", models["llama"], {s: moved / f"{s}.jsonl" for s in ("train", "val", "test")})
    assert ran(ok(train(elsewhere, prefect_api))) == []


def test_tokenizer_change_retokenizes_and_weights_change_only_retrains(cold, prefect_api, models, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model-copy"
    shutil.copytree(models["llama"], model)
    other = tmp_path / "copy-run"
    other.mkdir()
    write_config(other, "sft", model, cold.splits)
    assert ran(ok(train(other, prefect_api))) == []  # a byte-identical copy is the same model
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if k.endswith("mlp.up_proj.weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert ran(ok(train(other, prefect_api))) == ["train", "evaluate", "baseline", "slice", "hard_examples"]
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["model_max_length"] = 256
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert "tokenize" in ran(ok(train(other, prefect_api)))


def test_no_cache_and_refresh_force_recomputation(cold, prefect_api):
    folder, first = cold
    verifily_home = cold.home
    assert ran(ok(train(folder, prefect_api, "--no-cache"))) == STAGES
    assert not list((verifily_home / "cache").glob("*/.private-*")), "private folders are cleaned up"
    refreshed = ok(train(folder, prefect_api, "--refresh"))
    assert ran(refreshed) == STAGES
    assert (first / "adapter/adapter_model.safetensors").read_bytes() == \
           (refreshed / "adapter/adapter_model.safetensors").read_bytes()


def test_corrupted_or_missing_cache_files_are_a_miss_not_a_crash(cold, prefect_api):
    folder, _ = cold
    verifily_home = cold.home
    adapter = next((verifily_home / "cache/train").glob("*/adapter/adapter_model.safetensors"))
    adapter.write_bytes(adapter.read_bytes()[:-3] + b"xyz")
    predictions = next((verifily_home / "cache/evaluate").glob("*/predictions.parquet"))
    predictions.unlink()
    result = train(folder, prefect_api)
    assert "replayed:" not in result[0].stdout  # a damaged entry is never replayed: the flow recomputes it
    assert ran(ok(result)) == ["train", "evaluate"]


def test_cache_cli_lists_prunes_and_clears(cold):
    folder, _ = cold
    verifily_home = cold.home
    listing = run_cli("cache", "list", cwd=folder)
    assert listing.returncode == 0 and "train" in listing.stdout and "tokenize" in listing.stdout
    assert run_cli("cache", "prune", "--older-than", "30", cwd=folder).stdout.startswith("removed 0 ")
    cleared = run_cli("cache", "clear", cwd=folder)
    assert cleared.returncode == 0 and "removed 7 " in cleared.stdout
    assert not [p for p in (verifily_home / "cache/train").iterdir() if not p.name.startswith(".")]
    for folder in ("replay", "charts"):  # the replay record and memoised charts go with the entries
        assert not list((verifily_home / "cache" / folder).iterdir()), folder


def _start(folder: Path, prefect_api: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml"],
                            cwd=folder, env=cli_env({"PREFECT_API_URL": prefect_api}), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_training_resumes_from_checkpoint_and_matches_uninterrupted(tmp_path, models, sft_splits, prefect_api,
                                                                          verifily_home):
    sizes = {"training": {"num_epochs": 30, "save_steps": 10, "eval_steps": 25}}
    write_config(tmp_path, "sft", models["llama"], sft_splits, **sizes)
    proc = _start(tmp_path, prefect_api)
    marker = "cache/train/.work-*/checkpoints/checkpoint-*/.verifily-complete"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(verifily_home.glob(marker))) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/checksums.sha256"))
    resumed = ok(train(tmp_path, prefect_api))
    resumed_from = json.loads((resumed / "metrics.json").read_text())["train"]["resumed_from_step"]
    assert resumed_from and resumed_from >= 10
    uninterrupted = ok(train(tmp_path, prefect_api, "--no-cache"))
    assert json.loads((uninterrupted / "metrics.json").read_text())["train"]["resumed_from_step"] is None
    assert (resumed / "adapter/adapter_model.safetensors").read_bytes() == \
           (uninterrupted / "adapter/adapter_model.safetensors").read_bytes()
    a, b = (pd.read_parquet(r / "predictions.parquet") for r in (resumed, uninterrupted))
    assert a["loss"].tolist() == b["loss"].tolist()


def test_failure_in_a_later_stage_reuses_completed_stages(tmp_path, models, sft_splits, prefect_api, verifily_home):
    write_config(tmp_path, "sft", models["llama"], sft_splits)
    env = cli_env({"PREFECT_API_URL": prefect_api, "VERIFILY_FAIL_STAGE": "slice"})
    failed = run_cli("train", "-c", "train.yaml", cwd=tmp_path, env=env)
    assert failed.returncode == 1 and "injected failure" in failed.stderr
    record = json.loads(next((tmp_path / "runs").glob("*/run.json")).read_text())
    assert record["status"] == "failed" and record["stages"]["train"]["cache_hit"] is False
    assert ran(ok(train(tmp_path, prefect_api))) == ["slice", "hard_examples"]


def test_two_identical_concurrent_runs_both_verify(tmp_path, models, sft_splits, prefect_api):
    write_config(tmp_path, "sft", models["llama"], sft_splits)
    procs = [_start(tmp_path, prefect_api) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    runs = sorted((tmp_path / "runs").glob("run_*"))
    assert len(runs) == 2
    for run in runs:
        assert run_cli("runs", "verify", run.name, cwd=tmp_path).returncode == 0
    assert (runs[0] / "adapter/adapter_model.safetensors").read_bytes() == \
           (runs[1] / "adapter/adapter_model.safetensors").read_bytes()
    trained = [ran(r) for r in runs]
    assert sorted("train" in t for t in trained) == [False, True]  # one computed, the other waited and reused


def test_reproduce_reports_a_bitwise_match(cold, prefect_api):
    folder, run = cold
    result = run_cli("reproduce", run.name, cwd=folder, env=cli_env({"PREFECT_API_URL": prefect_api}))
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "adapter weights bitwise equal:  yes" in result.stdout
    assert "RESULT: reproduced exactly" in result.stdout
    assert "environment (env.json): identical" in result.stdout
