"""End to end through the CLI on tiny offline models: every model kind trains, evaluates and writes a verifiable Run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_user_error, cli_env, run_cli, train, write_config

pytestmark = pytest.mark.slow

def assert_complete_run(run: Path, task: str) -> dict:
    for name in ("run.json", "config.yaml", "env.json", "metrics.json", "predictions.parquet", "slices.json",
                 "hard_examples.jsonl", "trainer_log.jsonl", "checksums.sha256", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/labels.json"):
        assert (run / name).is_file(), name
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["run_id"] == run.name
    assert len(record["reproducibility_hash"]) == 64
    for key in ("job_id", "dataset_version", "base_model", "task", "config", "compute_mode", "device", "created_at",
                "config_hash"):
        assert key in record["job"], key
    assert record["job"]["task"] == task
    assert not os.access(run / "run.json", os.W_OK) or os.geteuid() == 0
    assert not (run.stat().st_mode & 0o222)
    return record


def test_sft_on_causal_lm_end_to_end(tmp_path, models, sft_splits, prefect_api):
    write_config(tmp_path, "sft", models["llama"], sft_splits)
    result, run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    record = assert_complete_run(run, "sft")
    assert record["evaluation"]["split"] == "test"
    assert record["metrics"]["loss"] > 0 and record["metrics"]["perplexity"] > 1
    slices = json.loads((run / "slices.json").read_text())["slices"]["source"]["values"]
    assert {s["value"] for s in slices} == {"human", "synthetic", "ai_contaminated"}
    hard = [json.loads(l) for l in (run / "hard_examples.jsonl").read_text().splitlines()]
    predictions = pd.read_parquet(run / "predictions.parquet")
    # eval.hard_examples 50 > 40 test rows: every row not answered exactly, and no exact answer among them
    assert len(hard) == int((predictions["exact_match"] < 1).sum()) and all("source" in h["tags"] for h in hard)
    assert all(h["exact_match"] < 1 for h in hard)
    assert hard[0]["token_f1"] <= hard[-1]["token_f1"] and "prediction" in hard[0]
    assert (run / "report.html").is_file() and (run / "data_rows.parquet").is_file()
    assert len(predictions) == 40 and {"example_id", "split", "tag.source", "loss"} <= set(predictions.columns)
    assert "slices by source" in result.stdout and "reproducibility_hash" in result.stdout
    assert "hard examples:" in result.stdout
    log = [json.loads(l) for l in (run / "trainer_log.jsonl").read_text().splitlines()]
    assert any("loss" in entry for entry in log)
    verified = run_cli("runs", "verify", run.name, cwd=tmp_path)
    assert verified.returncode == 0 and "match checksums" in verified.stdout


def test_sft_on_t5_evaluates_on_val_without_test_and_counts_truncation(tmp_path, models, sft_splits, prefect_api):
    splits = {"train": sft_splits["train"], "val": sft_splits["val"]}
    write_config(tmp_path, "sft", models["t5"], splits, training={"max_seq_length": 12})
    result, run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    record = assert_complete_run(run, "sft")
    assert record["evaluation"]["split"] == "val" and "no test split" in record["evaluation"]["note"]
    assert "no test split" in result.stdout
    assert record["metrics"]["truncated_rows"] > 0
    assert json.loads((run / "metrics.json").read_text())["truncated_by_split"]["train"] > 0


def test_classification_on_encoder_from_the_dataset_store(tmp_path, models, cls_splits, prefect_api):
    created = run_cli("dataset", "create", "--id", "ds_cls", "--version", "v1", "--task", "classification",
                      "--train", str(cls_splits["train"]), "--val", str(cls_splits["val"]),
                      "--test", str(cls_splits["test"]), cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    write_config(tmp_path, "classification", models["bert"], eval={"slice_by_tags": ["source", "difficulty"]})
    result, run = train(tmp_path, prefect_api, "--dataset", "ds_cls@v1")
    assert result.returncode == 0, result.stderr[-3000:]
    record = assert_complete_run(run, "classification")
    assert record["job"]["dataset_version"]["ref"] == "ds_cls@v1"
    assert 0 <= record["metrics"]["accuracy"] <= 1 and 0 <= record["metrics"]["macro_f1"] <= 1
    labels = json.loads((run / "adapter/labels.json").read_text())["labels"]
    assert labels == ["negative", "neutral", "positive"]
    predictions = pd.read_parquet(run / "predictions.parquet")
    assert {"predicted", "label", "prob_true", "correct"} <= set(predictions.columns)
    assert set(json.loads((run / "slices.json").read_text())["slices"]) == {"source", "difficulty"}


def test_classification_on_causal_lm(tmp_path, models, cls_splits, prefect_api):
    write_config(tmp_path, "classification", models["llama"], cls_splits)
    result, run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_complete_run(run, "classification")
    from safetensors import safe_open

    with safe_open(str(run / "adapter/adapter_model.safetensors"), "pt") as handle:
        assert any("score" in key for key in handle.keys())  # the head travels with the adapter


def test_two_identical_runs_give_the_same_hash_and_adapter_bytes(tmp_path, models, sft_splits, prefect_api):
    write_config(tmp_path, "sft", models["llama"], sft_splits)
    first, run_a = train(tmp_path, prefect_api)
    assert first.returncode == 0, first.stderr[-3000:]
    second, run_b = train(tmp_path, prefect_api, "--no-cache")  # recomputed, not read from the cache
    assert second.returncode == 0, second.stderr[-3000:]
    assert run_a != run_b
    assert not any(s["cache_hit"] for s in json.loads((run_b / "run.json").read_text())["stages"].values())
    a, b = (json.loads((r / "run.json").read_text()) for r in (run_a, run_b))
    assert a["reproducibility_hash"] == b["reproducibility_hash"]
    assert (run_a / "adapter/adapter_model.safetensors").read_bytes() == \
           (run_b / "adapter/adapter_model.safetensors").read_bytes()
    assert (run_a / "predictions.parquet").read_bytes() == (run_b / "predictions.parquet").read_bytes()
    assert (run_a / "adapter/adapter_config.json").read_bytes() == (run_b / "adapter/adapter_config.json").read_bytes()
    compared = run_cli("compare", run_a.name, run_b.name, cwd=tmp_path)
    assert compared.returncode == 0 and "overall (B - A)" in compared.stdout

    # one changed byte anywhere in a run is caught, and the file is named
    target = run_b / "adapter/adapter_model.safetensors"
    target.parent.chmod(0o755)
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    assert_user_error(run_cli("runs", "verify", run_b.name, cwd=tmp_path),
                      "adapter/adapter_model.safetensors", "sha256 mismatch")


def test_adapter_reloads_with_peft_and_reproduces_test_predictions(tmp_path, models, sft_splits, prefect_api):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verifily_train.config.schema import PromptSection
    from verifily_train.dataset.rows import iter_jsonl
    from verifily_train.model.tokenize import render_prompt

    write_config(tmp_path, "sft", models["llama"], sft_splits, compute={"bf16": False})
    result, run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    base = AutoModelForCausalLM.from_pretrained(models["llama"])
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    predictions = pd.read_parquet(run / "predictions.parquet").set_index("example_id")
    for lineno, row in list(iter_jsonl(sft_splits["test"]))[:10]:
        prompt = tok(render_prompt(row, PromptSection()))["input_ids"]
        target = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        assert abs(loss - predictions.loc[f"test:{lineno}", "loss"]) < 1e-4


def test_wrong_model_kind_fails_before_training(tmp_path, models, sft_splits, prefect_api):
    write_config(tmp_path, "sft", models["bert"], sft_splits)
    result, run = train(tmp_path, prefect_api)
    assert_user_error(result, "base_model", "model type 'bert' is neither a CausalLM nor a Seq2SeqLM")
    assert run is None


def test_missing_slice_tag_is_an_error_before_training(tmp_path, models, sft_splits, prefect_api):
    write_config(tmp_path, "sft", models["llama"], sft_splits, eval={"slice_by_tags": ["region"]})
    result, run = train(tmp_path, prefect_api)
    assert_user_error(result, "eval.slice_by_tags[0]", "tag key 'region' is not in the dataset")
    assert run is None


def test_failure_after_validation_leaves_a_failed_run_json_only(tmp_path, models, sft_splits, prefect_api):
    write_config(tmp_path, "sft", models["llama"], sft_splits, lora={"target_modules": ["no_such_module"]})
    result, run = train(tmp_path, prefect_api)
    assert_user_error(result, "lora.target_modules")
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "ConfigError"
    assert not (run / "checksums.sha256").exists() and not (run / "adapter").exists()
    assert run_cli("runs", "verify", run.name, cwd=tmp_path).returncode == 2


def test_run_killed_mid_training_leaves_no_completed_artifact(tmp_path, models, sft_splits, prefect_api, verifily_home):
    write_config(tmp_path, "sft", models["llama"], sft_splits, training={"num_epochs": 400, "save_steps": 5})
    proc = subprocess.Popen([sys.executable, "-m", "verifily_train.cli.main", "train", "-c", "train.yaml"],
                            cwd=tmp_path, env=cli_env({"PREFECT_API_URL": prefect_api}), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    pattern = "cache/train/.work-*/checkpoints/checkpoint-*/.verifily-complete"
    while time.time() < deadline and not list(verifily_home.glob(pattern)):
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.2)
    assert list(verifily_home.glob(pattern)), "training never checkpointed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    runs = tmp_path / "runs"
    completed = [p for p in runs.glob("*/run.json") if json.loads(p.read_text()).get("status") == "completed"] \
        if runs.exists() else []
    assert completed == []
    assert not list(runs.glob("*/checksums.sha256")) if runs.exists() else True
    listing = run_cli("runs", "list", cwd=tmp_path)
    assert "completed" not in listing.stdout


def test_full_finetune_without_eval_split_skips_evaluation_and_says_so(tmp_path, models, sft_splits, prefect_api):
    write_config(tmp_path, "sft", models["llama"], {"train": sft_splits["train"]}, lora={"enabled": False})
    result, run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["evaluation"]["skipped"] is True
    assert "evaluation skipped" in record["evaluation"]["note"] and "evaluation skipped" in result.stdout
    assert (run / "model/model.safetensors").is_file() and not (run / "adapter").exists()
    assert not (run / "predictions.parquet").exists()
    assert run_cli("runs", "verify", run.name, cwd=tmp_path).returncode == 0


def test_merged_model_is_saved_when_not_adapter_only(tmp_path, models, sft_splits, prefect_api):
    import torch
    from transformers import AutoModelForCausalLM

    write_config(tmp_path, "sft", models["llama"], sft_splits, output={"save_adapter_only": False},
                 compute={"bf16": False}, eval={"enabled": False})
    result, run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(run / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert "eval.enabled is false" in json.loads((run / "run.json").read_text())["evaluation"]["note"]
    base = AutoModelForCausalLM.from_pretrained(models["llama"])
    changed = [n for (n, p), (_, q) in zip(merged.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)  # auto targets for llama


def test_push_to_hub_without_hub_access_fails_before_training(tmp_path, models, sft_splits, prefect_api):
    write_config(tmp_path, "sft", models["llama"], sft_splits, output={"push_to_hub": True, "hub_model_id": "me/x"})
    result, run = train(tmp_path, prefect_api)
    assert_user_error(result, "output.push_to_hub", "HF_HUB_OFFLINE")
    assert run is None
