"""A model family is one entry in model/registry.py: every reader of family knowledge takes it from there."""

from __future__ import annotations

from types import SimpleNamespace

from verifily_train.config.schema import LoraSection
from verifily_train.model import last_layer, registry
from verifily_train.model.device import DevicePlan
from verifily_train.model.loading import KIND_CAUSAL, ModelSpec, position_limit
from verifily_train.model.lora import resolve_target_modules
from verifily_train.model.registry import Family
from verifily_train.training import speed
from verifily_train.training.loss import supports_label_only_head

FAKE = "fakellama"


def _fake_family_model():
    """A tiny llama-shaped CausalLM whose config names a model type no registry entry or PEFT mapping knows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    model.config.model_type = FAKE
    model.config._attn_implementation = "sdpa"
    return model


def _cpu_plan(model):
    cfg = SimpleNamespace(training=SimpleNamespace(compile=False), lora=SimpleNamespace(enabled=True))
    return speed.plan(cfg, DevicePlan("cpu", "fp32"), ModelSpec("fake", KIND_CAUSAL, FAKE, True), model)


def test_a_family_added_to_the_registry_gets_its_targets_and_fast_paths_everywhere(monkeypatch):
    model = _fake_family_model()
    spec = ModelSpec("fake", KIND_CAUSAL, FAKE, True)
    auto = LoraSection(target_modules="auto")
    assert not supports_label_only_head(model) and not last_layer.supports(model)
    unknown = _cpu_plan(model)
    assert not (unknown.label_only_head or unknown.pack_rows or unknown.last_layer_at_labels)
    assert resolve_target_modules(auto, spec) == "all-linear"

    monkeypatch.setitem(registry.FAMILIES, FAKE, Family(FAKE, lora_targets=("q_proj", "o_proj"), label_only_head=True,
                                                        last_layer_at_labels=True))
    assert supports_label_only_head(model) and last_layer.supports(model)
    known = _cpu_plan(model)
    assert known.label_only_head and known.pack_rows and known.last_layer_at_labels
    assert resolve_target_modules(auto, spec) == ["q_proj", "o_proj"]


def test_a_family_whose_decoder_layers_sit_elsewhere_is_read_there(monkeypatch):
    model = _fake_family_model()
    monkeypatch.setitem(registry.FAMILIES, FAKE, Family(FAKE, last_layer_at_labels=True, decoder_layers="model.blocks"))
    assert not last_layer.supports(model)  # no model.blocks
    model.model.blocks = model.model.layers
    assert last_layer.supports(model)


def test_position_offset_comes_from_the_registry(models, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models["llama"])
    assert position_limit(models["llama"]) == config.max_position_embeddings
    monkeypatch.setitem(registry.FAMILIES, "llama", Family("llama", positions_after_padding=True))
    assert position_limit(models["llama"]) == config.max_position_embeddings - ((config.pad_token_id or 0) + 1)


def test_training_pads_on_the_registry_side(models, sft_splits, tmp_path, monkeypatch):
    from verifily_train.config import load_config
    from verifily_train.model.loading import load_tokenizer
    from verifily_train.pipeline.fingerprint import fingerprint_stage
    from verifily_train.pipeline.runner import run_uncached
    from verifily_train.training.trainer import train_adapter

    cfg = load_config(None, ["task=sft", f"base_model={models['llama']}", f"data_paths.train={sft_splits['train']}",
                             f"data_paths.test={sft_splits['test']}", "training.max_steps=1", "training.batch_size=2",
                             "runtime.progress=false"])
    fp = fingerprint_stage(cfg, tmp_path / "cache")
    tokenized = run_uncached("tokenize", cfg, fp, tmp_path / "tok", tmp_path)
    spec = fp.model_spec
    monkeypatch.setitem(registry.FAMILIES, "llama", Family("llama", padding_side="left", label_only_head=True))
    tok = load_tokenizer(spec)
    manifest = train_adapter(cfg, spec, tok, tokenized, tmp_path / "tok", DevicePlan("cpu", "fp32"), tmp_path / "out",
                             tmp_path / "work")
    assert tok.padding_side == "left"
    assert manifest["label_only_head"] is True and manifest["label_rows_last_layers"] == 0


def test_evaluation_scores_with_the_registry_padding_side(models, sft_splits, tmp_path, monkeypatch):
    from verifily_train.config import load_config
    from verifily_train.evaluation import predict
    from verifily_train.model.loading import load_tokenizer
    from verifily_train.pipeline.fingerprint import fingerprint_stage
    from verifily_train.pipeline.runner import run_uncached

    cfg = load_config(None, ["task=sft", f"base_model={models['llama']}", f"data_paths.train={sft_splits['train']}",
                             f"data_paths.test={sft_splits['test']}", "eval.metrics=[loss]", "runtime.progress=false"])
    fp = fingerprint_stage(cfg, tmp_path / "cache")
    tokenized = run_uncached("tokenize", cfg, fp, tmp_path / "tok", tmp_path)
    monkeypatch.setitem(registry.FAMILIES, "llama", Family("llama", padding_side="left", label_only_head=True))
    seen, collator = [], predict.make_collator
    monkeypatch.setattr(predict, "make_collator", lambda spec, tok: seen.append(tok.padding_side) or collator(spec, tok))
    predict.predict_split(cfg, fp.model_spec, load_tokenizer(fp.model_spec), tokenized, tmp_path / "tok", None, None,
                          DevicePlan("cpu", "fp32"), tmp_path / "out")
    assert seen == ["left"]
