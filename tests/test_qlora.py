"""QLoRA (4-bit NF4) and 8-bit LoRA through bitsandbytes on this CPU, including the silent gradient trap."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_user_error, cli_env, run_cli, train, write_config

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes not installed (pip install -e '.[qlora]')")


def _quantized_llama(path: Path, disable_repacking: bool):
    import torch
    from transformers import AutoModelForCausalLM

    from verifily_train.config.schema import LoraSection
    from verifily_train.model.lora import build_adapter
    from verifily_train.model.loading import KIND_CAUSAL, ModelSpec
    from verifily_train.model.quantization import prepare_quantized, quantization_config

    lora = LoraSection(quantization="4bit", bnb_4bit_compute_dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config(lora, "cpu"),
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    if disable_repacking:
        model = prepare_quantized(model)
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    return build_adapter(model, lora, ModelSpec(str(path), KIND_CAUSAL, "llama", True))


def _lora_grad_after_an_eval(model) -> float:
    import torch

    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    model.eval()
    with torch.no_grad():  # what an evaluation during training does
        model(input_ids=ids)
    model.train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # B starts at zero; give A's gradient a path too
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(float(p.grad.abs().sum()) for n, p in model.named_parameters() if "lora_A" in n and p.grad is not None)


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """Hidden size 64: the smallest fixture where the trap is silent (at 32 the repacked layer crashes)."""
    from verifily_train.fixtures.models import build_model

    return build_model("llama", tmp_path_factory.mktemp("llama64"), hidden=64)


@needs_bnb
def test_4bit_lora_keeps_gradients_after_an_evaluation(llama64):
    assert _lora_grad_after_an_eval(_quantized_llama(llama64, disable_repacking=True)) > 0


@needs_bnb
def test_the_cpu_4bit_trap_is_real_without_the_workaround(llama64):
    from verifily_train.model.device import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("the trap needs a CPU with AVX512-BF16/AMX")
    # no error, only a warning: LoRA matrices simply stop learning
    assert _lora_grad_after_an_eval(_quantized_llama(llama64, disable_repacking=False)) == 0


@needs_bnb
def test_qlora_weights_keep_changing_across_evaluations(tmp_path, models, sft_splits):
    """Train stage in-process with an evaluation every 2 steps: adapters at steps 4 and 8 differ."""
    from safetensors.torch import load_file

    from verifily_train.pipeline import runner as stages

    from verifily_train.pipeline.fingerprint import fingerprint_stage
    from verifily_train.config import load_config

    config = write_config(tmp_path, "sft", models["llama"], sft_splits,
                          training={"max_steps": 8, "eval_steps": 2, "save_steps": 4},
                          lora={"quantization": "4bit"})
    cfg = load_config(config)
    fp = fingerprint_stage(cfg, tmp_path / "cache")
    (tmp_path / "tok").mkdir()
    tokenized = dict(stages.run_uncached("tokenize", cfg, fp, tmp_path / "tok", tmp_path), dir=str(tmp_path / "tok"))
    (tmp_path / "out").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    trained = stages.run_uncached("train", cfg, fp, tmp_path / "out", work, tokenize=tokenized)
    assert trained["global_step"] == 8
    log = [json.loads(l) for l in (tmp_path / "out/trainer_log.jsonl").read_text().splitlines()]
    assert sum("eval_loss" in e for e in log) >= 3
    at4 = load_file(work / "checkpoints/checkpoint-4/adapter_model.safetensors")
    at8 = load_file(tmp_path / "out/adapter/adapter_model.safetensors")
    changed = [k for k in at4 if not (at4[k] == at8[k].to(at4[k].dtype)).all()]
    assert len(changed) == len(at4), "every LoRA matrix must keep training after the evaluations"


@needs_bnb
@pytest.mark.slow
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_run_end_to_end_records_quantization(tmp_path, models, sft_splits, prefect_api, bits):
    write_config(tmp_path, "sft", models["llama"], sft_splits, lora={"quantization": bits},
                 training={"eval_steps": 2})
    result, run = train(tmp_path, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert record["quantization"] == bits and record["status"] == "completed"
    assert record["metrics"]["loss"] > 0
    assert record["baseline_quantization"] == bits  # the gain is measured against the base quantized the same way
    assert record["metrics"]["baseline_loss"] > 0
    # row attribution on the quantized Run (issue 24): the scoring model loads the base quantized the same way,
    # and the gradient and loss methods score every train row
    scored = run_cli("attribute", str(run), "--rows", "--methods", "tracin,self_influence,loss", "--projection-dim",
                     "64", "--json", cwd=tmp_path, env=cli_env({"PREFECT_API_URL": prefect_api}))
    assert scored.returncode == 0, scored.stderr[-3000:]
    rows = json.loads(scored.stdout[scored.stdout.index("{"):])
    table = pd.read_parquet(Path(rows["path"]) / "row_attribution.parquet")
    assert len(table) == rows["train_rows"] == 48
    for method in ("tracin", "self_influence", "loss"):
        assert table[f"score_{method}"].notna().all() and table[f"score_{method}"].abs().sum() > 0, method


BLOCK_BNB = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
import importlib.util
_real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "bitsandbytes" else _real(name, *a, **k)
from verifily_train.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_quantization_without_bitsandbytes_stops_before_any_work(tmp_path, models, sft_splits):
    write_config(tmp_path, "sft", models["llama"], sft_splits, lora={"quantization": "4bit"})
    result = subprocess.run([sys.executable, "-c", BLOCK_BNB, "train", "-c", "train.yaml"], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=120)
    assert_user_error(result, "lora.quantization", "bitsandbytes", "pip install 'verifily-train[qlora]'")
    assert not (tmp_path / "runs").exists()
