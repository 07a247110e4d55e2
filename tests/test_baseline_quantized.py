"""A QLoRA run's baseline is its base quantized the same way: the reported gain is fine-tuning alone."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from conftest import write_config
from verifily_train.config import load_config
from verifily_train.config.schema import LoraSection
from verifily_train.evaluation.baseline import baseline_load_plan
from verifily_train.pipeline.contract import Fingerprint, Tokenized

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes not installed (pip install -e '.[qlora]')")
FP = Fingerprint(dataset={"data_hash": "d" * 64}, data_hash="d" * 64, config_hash="c" * 64, model={},
                 model_identity="sha256:" + "a" * 64, gguf_conversion=None, tokenizer_identity=None,
                 device={"device": "cpu", "precision": "fp32"}, numeric_env={})
TOKENIZED = Tokenized(stage="tokenize", splits={}, labels=[], eval_split=None, eval_note=None, truncated_rows=0,
                      max_seq_length=0, prompt=None, render_check=None, stop_token_ids=[], warnings=[],
                      output_hash="b" * 64)


@pytest.mark.parametrize("bits", ["none", "4bit", "8bit"])
def test_the_baseline_loads_the_base_with_the_training_runs_quantization(bits):
    plan = baseline_load_plan(LoraSection(quantization=bits, bnb_4bit_compute_dtype="float16"))
    assert plan["quantization"] == bits
    assert plan["bnb_4bit_compute_dtype"] == ("float16" if bits == "4bit" else None)


def test_full_fine_tuning_has_an_unquantized_baseline():
    assert baseline_load_plan(LoraSection(enabled=False, quantization="4bit"))["quantization"] == "none"


def _key(cfg, **lora):
    from verifily_train.pipeline.evaluate import BASELINE
    from verifily_train.pipeline.stage import StageContext

    return BASELINE.key(StageContext(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, **lora)), FP,
                                     {"tokenize": TOKENIZED}))


def test_the_baseline_cache_key_changes_with_the_quantization(tmp_path, sft_splits):
    write_config(tmp_path, "sft", tmp_path, sft_splits)
    cfg = load_config(tmp_path / "train.yaml")
    keys = {bits: _key(cfg, quantization=bits) for bits in ("none", "4bit", "8bit")}
    assert len(set(keys.values())) == 3
    assert _key(cfg, quantization="4bit", bnb_4bit_compute_dtype="float32") != keys["4bit"]
    # the baseline is untrained: the LoRA rank and the training settings do not re-key it
    assert _key(cfg, quantization="4bit", r=4) == keys["4bit"] and _key(cfg, r=4) == keys["none"]


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    from verifily_train.fixtures.models import build_model

    return build_model("llama", tmp_path_factory.mktemp("llama64"), hidden=64)


def _logits(model):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])).logits.float().cpu()


def _untrained_model_logits(llama64, tmp_path, bits: str, device: str):
    """The baseline's model, loaded through the trained adapter's load path with the all-zero adapter."""
    from verifily_train.config.schema import TrainConfig
    from verifily_train.evaluation.baseline import write_untrained_adapter
    from verifily_train.evaluation.predict import load_trained_model
    from verifily_train.model.device import DevicePlan
    from verifily_train.model.loading import KIND_CAUSAL, ModelSpec, load_tokenizer

    spec = ModelSpec(str(llama64), KIND_CAUSAL, "llama", True)
    cfg = TrainConfig(task="sft", base_model=str(llama64),
                      lora=LoraSection(quantization=bits, bnb_4bit_compute_dtype="float32"))
    untrained = write_untrained_adapter(cfg, spec, tmp_path)
    model = load_trained_model(cfg, spec, load_tokenizer(spec), [], tmp_path, untrained, DevicePlan(device, "fp32"))
    return _logits(model)


def _quantized_base_logits(llama64, bits: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from verifily_train.model.quantization import disable_cpu_4bit_repacking, quantization_config

    lora = LoraSection(quantization=bits, bnb_4bit_compute_dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(llama64, dtype=torch.float32,
                                                 quantization_config=quantization_config(lora, device),
                                                 device_map={"": device if device != "cuda" else 0})
    disable_cpu_4bit_repacking(model)
    return _logits(model)


def _fp32_base_logits(llama64):
    import torch
    from transformers import AutoModelForCausalLM

    return _logits(AutoModelForCausalLM.from_pretrained(llama64, dtype=torch.float32))


def test_the_all_zero_adapter_leaves_the_unquantized_base_exactly_unchanged(llama64, tmp_path):
    import torch

    assert torch.equal(_untrained_model_logits(llama64, tmp_path, "none", "cpu"), _fp32_base_logits(llama64))


@needs_bnb
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantized_runs_baseline_model_is_the_base_quantized_the_same_way(llama64, tmp_path, bits):
    import torch

    baseline = _untrained_model_logits(llama64, tmp_path, bits, "cpu")
    assert torch.equal(baseline, _quantized_base_logits(llama64, bits, "cpu"))
    assert not torch.equal(baseline, _fp32_base_logits(llama64))  # what the old baseline scored


@pytest.mark.gpu
@needs_bnb
def test_a_qlora_baseline_on_cuda_is_the_4bit_base(llama64, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    baseline = _untrained_model_logits(llama64, tmp_path, "4bit", "cuda")
    assert torch.equal(baseline, _quantized_base_logits(llama64, "4bit", "cuda"))
    assert not torch.equal(baseline, _fp32_base_logits(llama64))


@needs_bnb
def test_the_baseline_stage_of_a_4bit_run_scores_the_4bit_base(tmp_path, models, sft_splits):
    """In process: fingerprint, tokenize, then the baseline stage with and without 4-bit quantization."""
    from verifily_train.pipeline import runner as stages
    from verifily_train.pipeline.fingerprint import fingerprint_stage

    losses = {}
    for bits in ("none", "4bit"):
        folder = tmp_path / bits
        folder.mkdir()
        write_config(folder, "sft", models["llama"], sft_splits, lora={"quantization": bits},
                     eval={"metrics": ["loss", "perplexity"]})
        cfg = load_config(folder / "train.yaml")
        fp = fingerprint_stage(cfg, folder / "cache")
        (folder / "tok").mkdir()
        tokenized = dict(stages.run_uncached("tokenize", cfg, fp, folder / "tok", folder), dir=str(folder / "tok"))
        (folder / "out").mkdir()
        (folder / "work").mkdir()
        manifest = stages.run_uncached("baseline", cfg, fp, folder / "out", folder / "work", tokenize=tokenized)
        assert manifest["stage"] == "baseline" and manifest["quantization"] == bits and not manifest["skipped"]
        assert (folder / "out" / "predictions.parquet").is_file()
        losses[bits] = manifest["metrics"]["loss"]
    assert losses["4bit"] != losses["none"] and losses["4bit"] > 0
