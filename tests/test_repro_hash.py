"""The reproducibility hash covers what can change a run's weights or metrics, and no location, id or runtime knob."""

from __future__ import annotations

import dataclasses
import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest

from conftest import train, write_config
from verifily_train.artifacts.run import reproducibility_components, reproducibility_hash
from verifily_train.config import load_config
from verifily_train.artifacts.env import digest_sources, package_sources, source_digest
from verifily_train.model.identity import model_identity, tokenizer_identity

ENV = {"env_hash": "e" * 64, "device": "cpu", "precision": "fp32"}


@pytest.fixture
def job(tmp_path, sft_splits):
    """A tiny llama folder, a gold set and a config naming both."""
    from verifily_train.fixtures.models import build_model

    model = build_model("llama", tmp_path / "models" / "llama")
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"instruction": "say hi", "output": "hi"}) + "\n")
    write_config(tmp_path, "sft", model, sft_splits, eval={"gold_set": str(gold)})
    return {"folder": tmp_path, "model": model, "gold": gold, "cfg": load_config(tmp_path / "train.yaml")}


def repro_hash(cfg, model: Path | None = None, **env) -> str:
    """The hash of a run of ``cfg`` on the model folder it names (identities read now, nothing memoised)."""
    model = Path(cfg.base_model) if model is None else model
    return reproducibility_hash(reproducibility_components(
        cfg, data_hash="sha256:" + "d" * 64, model_identity=model_identity(str(model), True),
        tokenizer_identity=tokenizer_identity(str(model), True), **dict(ENV, **env)))


def replace(cfg, **sections):
    """``cfg`` with ``section={key: value}`` changed (or a top-level key given as a plain value)."""
    changes = {name: dataclasses.replace(getattr(cfg, name), **value) if isinstance(value, dict) else value
               for name, value in sections.items()}
    return dataclasses.replace(cfg, **changes)


def test_new_weights_at_the_same_path_change_the_hash(job):
    from verifily_train.fixtures.models import build_model

    before = repro_hash(job["cfg"])
    build_model("llama", job["model"], seed=1)  # same folder, same tokenizer, other weights
    assert repro_hash(job["cfg"]) != before


def test_a_new_tokenizer_at_the_same_path_changes_the_hash(job):
    before = repro_hash(job["cfg"])
    config = job["model"] / "tokenizer_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), model_max_length=77)))
    assert repro_hash(job["cfg"]) != before


def test_moving_the_model_folder_keeps_the_hash(job, tmp_path):
    moved = tmp_path / "elsewhere" / "renamed-llama"
    shutil.copytree(job["model"], moved)
    assert repro_hash(replace(job["cfg"], base_model=str(moved))) == repro_hash(job["cfg"])


def test_gold_set_bytes_change_the_hash_and_its_location_does_not(job, tmp_path):
    before = repro_hash(job["cfg"])
    copy = tmp_path / "copies" / "gold-renamed.jsonl"
    copy.parent.mkdir()
    shutil.copyfile(job["gold"], copy)
    assert repro_hash(replace(job["cfg"], eval={"gold_set": str(copy)})) == before
    copy.write_text(json.dumps({"instruction": "say hi", "output": "hello"}) + "\n")
    assert repro_hash(replace(job["cfg"], eval={"gold_set": str(copy)})) != before
    assert repro_hash(replace(job["cfg"], eval={"gold_set": None})) != before


def test_the_components_name_this_tools_version_and_source_digest(job):
    components = reproducibility_components(job["cfg"], data_hash="sha256:x", model_identity="m",
                                            tokenizer_identity="t", **ENV)
    assert components["tool_version"] == metadata.version("verifily-train")
    assert components["source_digest"] == digest_sources(package_sources()) == source_digest()


@pytest.mark.parametrize("component", ["tool_version", "source_digest", "model_identity", "tokenizer_identity",
                                       "gold_set_sha256", "data_hash", "env_hash"])
def test_each_identity_component_changes_the_hash(job, component):
    components = reproducibility_components(job["cfg"], data_hash="sha256:x", model_identity="m",
                                            tokenizer_identity="t", **ENV)
    assert reproducibility_hash(dict(components, **{component: "other"})) != reproducibility_hash(components)


def test_the_source_digest_follows_file_contents_not_their_location(tmp_path):
    files = package_sources()
    assert {"pipeline/cache.py", "artifacts/run.py", "flows/train.py", "tasks/common.py"} <= set(files)
    copy = {}
    for name, path in files.items():
        target = tmp_path / "copy" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copy[name] = target
    assert digest_sources(copy) == digest_sources(files)
    copy["artifacts/run.py"].write_text(copy["artifacts/run.py"].read_text() + "\n# an edit\n")
    assert digest_sources(copy) != digest_sources(files)


GPU = {"device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3", "cuda_version": "12.4", "precision": "bf16"}


@pytest.mark.parametrize("change", [{"device": "cpu"}, {"gpu_name": "NVIDIA H200"}, {"cuda_version": "12.8"},
                                    {"precision": "fp32"}], ids=["device-kind", "gpu-name", "cuda", "precision"])
def test_device_kind_gpu_cuda_and_precision_change_the_hash(job, change):
    assert repro_hash(job["cfg"], **dict(GPU, **change)) != repro_hash(job["cfg"], **GPU)


@pytest.mark.parametrize("sections", [
    {"output": {"dir": "elsewhere/runs/", "save_adapter_only": False}},
    {"runtime": {"num_workers": 3, "progress": False}},
    {"training": {"logging_steps": 1, "report_to": "tensorboard", "retries": 4}},
    {"cache": {"dir": "/tmp/another-cache", "enabled": False}},
    {"compute": {"mode": "self_host", "device": "cpu"}},  # the device that really ran is the component
    {"dataset_version": "ds_x@v9"},  # the data enters as its bytes (data_hash)
], ids=["output", "runtime", "logging", "cache", "compute-request", "dataset-ref"])
def test_locations_and_runtime_settings_keep_the_hash(job, sections):
    assert repro_hash(replace(job["cfg"], **sections)) == repro_hash(job["cfg"])


@pytest.mark.parametrize("sections", [{"training": {"learning_rate": 1e-3}}, {"lora": {"quantization": "4bit"}},
                                      {"seed": 7}, {"eval": {"max_new_tokens": 8}}])
def test_settings_that_change_results_change_the_hash(job, sections):
    assert repro_hash(replace(job["cfg"], **sections)) != repro_hash(job["cfg"])


@pytest.mark.slow
def test_a_run_on_a_moved_model_folder_has_the_same_hash(tmp_path, models, sft_splits, prefect_api):
    """End to end: the second run (model folder moved, another output dir) hits the cache and keeps the hash."""
    model = tmp_path / "models" / "llama"
    shutil.copytree(models["llama"], model)
    write_config(tmp_path, "sft", model, sft_splits, eval={"metrics": ["loss", "perplexity"]})
    first, run_a = train(tmp_path, prefect_api)
    assert first.returncode == 0, first.stderr[-3000:]
    moved = tmp_path / "moved" / "llama-copy"
    shutil.move(str(model), moved)
    write_config(tmp_path, "sft", moved, sft_splits, eval={"metrics": ["loss", "perplexity"]},
                 output={"dir": "other-runs/"})
    second, _ = train(tmp_path, prefect_api)
    assert second.returncode == 0, second.stderr[-3000:]
    (run_b,) = (tmp_path / "other-runs").glob("run_*")
    a, b = (json.loads((run / "run.json").read_text()) for run in (run_a, run_b))
    assert a["job"]["base_model"] != b["job"]["base_model"] and a["run_id"] != b["run_id"]
    differ = {k: (v, b["reproducibility"]["components"].get(k)) for k, v in a["reproducibility"]["components"].items()
              if b["reproducibility"]["components"].get(k) != v}
    assert differ == {}
    assert b["reproducibility_hash"] == a["reproducibility_hash"] == a["reproducibility"]["hash"]
    components = a["reproducibility"]["components"]
    assert components["model_identity"] == a["model_identity"] and components["device_kind"] == "cpu"
    assert components["gpu_name"] is None and components["cuda_version"] is None
    assert components["tool_version"] == metadata.version("verifily-train")
    assert all(s["cache_hit"] for s in b["stages"].values())
