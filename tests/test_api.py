"""The Python API (verifily_train/api.py): docs/python.md's walk-through runs, results are DataFrames, errors raise."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, run_cli, write_config

WALKTHROUGH = REPO / "docs" / "python.md"

CHECKS = '''
import json, sys
assert "verifily_train.api" in sys.modules
out = {
    "run_path": str(run.path), "status": run.status, "replayed_r4": bool(run_r4.summary.get("replayed")),
    "metrics_loss": run.metrics["loss"], "baseline_loss": run.metrics.get("baseline_loss"),
    "slice_columns": list(run.slices.columns), "slice_keys": sorted(set(run.slices.key)),
    "slice_values": sorted(str(v) for v in run.slices[run.slices.key == "source"].value),
    "overall_loss": float(run.slices[run.slices.key == "overall"].loss.iloc[0]),
    "predictions": len(run.predictions), "hard_examples": len(run.hard_examples),
    "verified_files": run.verify(), "report": run.report_path.is_file(), "lora_r": run.config.lora.r,
    "cmp_overall_metrics": sorted(cmp.overall.metric), "cmp_slice_columns": list(cmp.slices.columns),
    "cmp_config_keys": sorted(cmp.config_diff.key), "cmp_names_both": run.run_id in str(cmp) and run_r4.run_id in str(cmp),
    "plan_values": sorted(plan.verdicts.value), "plan_dry": plan.dry_run,
    "again": str(vt.load_run(run.run_id).path),
}
print("CHECKS " + json.dumps(out))
'''


def python_blocks(markdown: str) -> str:
    """Every ```python block of a document, in order, as one script."""
    return "\n".join(re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL))


def test_the_docs_walkthrough_trains_reads_compares_and_plans_from_python(tmp_path, models, sft_splits, prefect_api):
    write_config(tmp_path, "sft", models["llama"], sft_splits, eval={"slice_by_tags": ["source"]})
    script = python_blocks(WALKTHROUGH.read_text(encoding="utf-8")) + CHECKS
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env=cli_env({"PREFECT_API_URL": prefect_api}), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("CHECKS ", 1)[1])
    assert out["status"] == "completed" and Path(out["run_path"]).is_dir()
    assert out["metrics_loss"] == pytest.approx(out["overall_loss"]) and out["baseline_loss"] is not None
    assert out["slice_columns"][:4] == ["key", "value", "n", "low_confidence"]
    assert {"loss", "loss_ci95_low", "loss_ci95_high", "delta_loss", "baseline_loss"} <= set(out["slice_columns"])
    assert out["slice_keys"] == ["overall", "source"] and out["slice_values"] == ["ai_contaminated", "human", "synthetic"]
    assert out["predictions"] == 40 and out["hard_examples"] > 0 and out["verified_files"] > 5 and out["report"]
    assert out["lora_r"] == 16 and not out["replayed_r4"]  # r=4 is a new config: a real second run
    assert "loss" in out["cmp_overall_metrics"] and "significant" in out["cmp_slice_columns"]
    assert "lora.r" in out["cmp_config_keys"] and out["cmp_names_both"]  # the terminal table
    assert out["plan_values"] == ["ai_contaminated", "human", "synthetic"] and out["plan_dry"]
    assert Path(out["again"]).resolve() == Path(out["run_path"]).resolve()
    assert "Traceback" not in result.stderr

    shown = run_cli("runs", "show", out["run_path"], cwd=tmp_path)  # the CLI's summary of the same Run
    assert shown.returncode == 0 and shown.stdout.startswith("Run run_"), shown.stderr
    assert f"  report: {Path(out['run_path']) / 'report.html'}" in shown.stdout and "metrics: loss=" in shown.stdout


def test_importing_the_package_imports_neither_the_api_nor_prefect():
    code = ("import sys, verifily_train as vt; assert callable(vt.load_run);"
            "print(sorted(m for m in ('prefect', 'torch', 'verifily_train.api') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['verifily_train.api']"  # reached on first use, and without Prefect or torch


def test_a_missing_run_raises_the_projects_error_not_systemexit(tmp_path, monkeypatch):
    import verifily_train as vt

    monkeypatch.chdir(tmp_path)
    with pytest.raises(vt.VerifilyError, match="no such run"):
        vt.load_run("run_that_does_not_exist")
    with pytest.raises(vt.VerifilyError, match="no such run"):
        vt.compare("run_a", "run_b")


def test_a_bad_config_key_raises_before_any_work(tmp_path, monkeypatch, models):
    import verifily_train as vt
    from verifily_train.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="lora.rank"):
        vt.train({"task": "sft", "base_model": str(models["llama"])}, lora__rank=8)
    with pytest.raises(vt.VerifilyError, match="train.yaml"):
        vt.train(tmp_path / "train.yaml")


def test_missing_data_raises_before_prefect_starts(tmp_path, monkeypatch, models):
    import verifily_train as vt

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(vt.VerifilyError, match="missing.jsonl: data_paths.train: file not found"):
        vt.train({"task": "sft", "base_model": str(models["llama"]), "data_paths": {"train": "missing.jsonl"}})


def test_keyword_overrides_become_dotted_overrides():
    from verifily_train.api import _overrides

    assert _overrides({"training": {"num_epochs": 1, "learning_rate": 1e-4}, "lora__r": 8,
                       "dataset_version": "ds_x@v2", "eval": {"slice_by_tags": ["source"]}}) == [
        "training.num_epochs=1", "training.learning_rate=0.0001", "lora.r=8", 'dataset_version="ds_x@v2"',
        'eval.slice_by_tags=["source"]']


SECOND_TRAIN = '''
import sys
import verifily_train as vt
messages = []
for _ in range(2):
    try:
        vt.train("train.yaml")
    except vt.VerifilyError as err:
        messages.append(str(err))
print("MESSAGES", repr(messages))
'''


def test_a_missing_model_is_reported_alike_by_every_train_call_of_a_process(tmp_path, sft_splits, prefect_api):
    """The Hub unreachable: the first call sets HF_HUB_OFFLINE for the process; the second must still say why only the
    local Hub cache was tried (the model fails at preflight: nothing trains)."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on: the Hub's connection is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    write_config(tmp_path, "sft", Path("verifily-test/no-such-model"), sft_splits)
    env = cli_env({"PREFECT_API_URL": prefect_api, "HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", SECOND_TRAIN], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = eval(result.stdout.split("MESSAGES ", 1)[1])
    assert "the Hub is unreachable: only the local Hub cache was tried" in first
    assert second == first
