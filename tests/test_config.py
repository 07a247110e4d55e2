"""train.yaml: defaults, validation rules, overrides, did-you-mean, and config_hash normalization."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from verifily_train.config import config_hash, load_config
from verifily_train.config.schema import TrainConfig
from verifily_train.errors import ConfigError

BASE = """
task: sft
base_model: org/model
data_paths:
  train: data/train.jsonl
"""


def write(tmp_path: Path, text: str, name: str = "train.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_spec_defaults_are_filled_in(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.training.num_epochs == 3 and cfg.training.batch_size == 8
    assert cfg.training.gradient_accumulation_steps == 4 and cfg.training.learning_rate == 2e-4
    assert cfg.training.lr_scheduler == "cosine" and cfg.training.warmup_ratio == 0.03
    assert cfg.training.max_seq_length == 2048 and cfg.training.eval_steps == 500
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32 and cfg.lora.dropout == 0.05
    assert cfg.lora.target_modules == "auto" and cfg.lora.quantization == "none"
    assert cfg.compute.mode == "local" and cfg.compute.device == "auto" and cfg.compute.bf16 is True
    assert cfg.eval.metrics[:2] == ["loss", "perplexity"] and cfg.eval.slice_by_tags == ["source"]
    assert cfg.output.dir == "runs/" and cfg.output.save_adapter_only is True and cfg.seed == 42


def test_classification_gets_its_own_default_metrics(tmp_path):
    cfg = load_config(write(tmp_path, BASE.replace("task: sft", "task: classification")))
    assert cfg.eval.metrics == ["accuracy", "macro_f1"]


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.data_paths.train == str((tmp_path / "data/train.jsonl").resolve())


def test_dotted_overrides_apply_and_parse_types(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["training.num_epochs=1", "lora.r=8", "eval.slice_by_tags=[source,difficulty]",
                                              "lora.target_modules=[q_proj,v_proj]", "compute.bf16=false"])
    assert cfg.training.num_epochs == 1 and cfg.lora.r == 8
    assert cfg.eval.slice_by_tags == ["source", "difficulty"]
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.compute.bf16 is False


def test_rule1_task_must_be_sft_or_classification(tmp_path):
    assert "task: must be one of sft, classification" in error_of(tmp_path, BASE.replace("task: sft", "task: dpo"))


def test_rule2_needs_dataset_version_or_train_path(tmp_path):
    msg = error_of(tmp_path, "task: sft\nbase_model: org/m\n")
    assert "dataset_version" in msg and "data_paths.train" in msg


def test_rule2_rejects_both_dataset_version_and_paths(tmp_path):
    assert "not both" in error_of(tmp_path, BASE + "dataset_version: ds_x@v1\n")


def test_rule3_quantization_needs_bitsandbytes(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    msg = error_of(tmp_path, BASE + "lora:\n  quantization: 4bit\n")
    assert "lora.quantization" in msg and "bitsandbytes" in msg


def test_missing_required_key_is_named(tmp_path):
    assert "base_model: is required" in error_of(tmp_path, "task: sft\ndata_paths: {train: a.jsonl}\n")


@pytest.mark.parametrize("override, key", [
    ("training.learning_rate=0", "training.learning_rate"),
    ("training.learning_rate=-1e-4", "training.learning_rate"),
    ("training.warmup_ratio=1.0", "training.warmup_ratio"),
    ("training.warmup_ratio=-0.1", "training.warmup_ratio"),
    ("lora.r=0", "lora.r"),
    ("training.max_seq_length=4", "training.max_seq_length"),
    ("training.lr_scheduler=cosin", "training.lr_scheduler"),
    ("compute.device=tpu", "compute.device"),
    ("lora.quantization=2bit", "lora.quantization"),
    ("compute.fp16=true", "compute.fp16"),
    ("training.num_epochs=0", "training.num_epochs"),
    ("training.batch_size=0", "training.batch_size"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("training.report_to=neptune", "training.report_to"),
    ("eval.metrics=[loss,bleu]", "eval.metrics[1]"),
    ("output.push_to_hub=true", "output.hub_model_id"),
    ("training.num_epochs=three", "training.num_epochs"),
    ("lora.r=2.5", "lora.r"),
    ("compute.bf16=maybe", "compute.bf16"),
])
def test_each_invalid_value_names_its_key(tmp_path, override, key):
    msg = error_of(tmp_path, BASE, [override])
    assert f": {key}:" in msg or msg.startswith(f"{key}:") or f" {key}:" in msg, msg


def test_unknown_file_key_suggests_the_closest(tmp_path):
    msg = error_of(tmp_path, BASE + "training:\n  num_epoch: 2\n")
    assert "training.num_epoch: unknown key (did you mean training.num_epochs?)" in msg
    assert "train.yaml" in msg


def test_unknown_override_key_suggests_the_closest(tmp_path):
    msg = error_of(tmp_path, BASE, ["lora.rank=8"])
    assert msg.startswith("command line: lora.rank: unknown key")
    assert "did you mean lora.r" in msg


def test_unknown_top_level_key(tmp_path):
    assert "did you mean base_model?" in error_of(tmp_path, BASE + "base_modle: x\n")


def test_yaml_syntax_error_names_the_line(tmp_path):
    msg = error_of(tmp_path, "task: sft\nbase_model: [unclosed\ntraining:\n  x: 1\n")
    assert "train.yaml: line" in msg and "YAML syntax error" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override(tmp_path):
    assert "key=value" in error_of(tmp_path, BASE, ["training.num_epochs"])


def test_config_hash_ignores_key_order_comments_and_number_spelling(tmp_path):
    a = write(tmp_path, BASE + "training:\n  learning_rate: 2e-4\n  num_epochs: 2\n", "a.yaml")
    b = write(tmp_path, "# a comment\ntraining:\n  num_epochs: 2   # two\n  learning_rate: 0.0002\n" + BASE, "b.yaml")
    assert config_hash(load_config(a)) == config_hash(load_config(b))


def test_config_hash_ignores_keys_that_cannot_change_results(tmp_path):
    path = write(tmp_path, BASE)
    base = config_hash(load_config(path))
    for override in ("output.dir=elsewhere/", "training.logging_steps=1", "runtime.num_workers=2",
                     "training.report_to=tensorboard", "data_paths.train=other/train.jsonl"):
        assert config_hash(load_config(path, [override])) == base, override


def test_config_hash_changes_with_meaning(tmp_path):
    path = write(tmp_path, BASE)
    base = config_hash(load_config(path))
    for override in ("lora.r=8", "training.learning_rate=1e-4", "seed=1", "training.max_seq_length=512",
                     "eval.slice_by_tags=[difficulty]"):
        assert config_hash(load_config(path, [override])) != base, override


def test_schema_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import verifily_train.config.schema, verifily_train.config, sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_every_spec_key_is_in_the_schema():
    from verifily_train.config.load import known_keys

    keys = set(known_keys(TrainConfig))
    spec = ["task", "base_model", "dataset_version", "data_paths.train", "data_paths.val", "data_paths.test",
            "training.num_epochs", "training.batch_size", "training.gradient_accumulation_steps",
            "training.learning_rate", "training.lr_scheduler", "training.warmup_ratio", "training.weight_decay",
            "training.max_grad_norm", "training.max_seq_length", "training.eval_steps", "training.save_steps",
            "training.logging_steps", "lora.enabled", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
            "lora.quantization", "lora.bnb_4bit_compute_dtype", "compute.mode", "compute.device", "compute.fp16",
            "compute.bf16", "eval.enabled", "eval.metrics", "eval.gold_set", "eval.slice_by_tags", "output.dir",
            "output.save_adapter_only", "output.push_to_hub", "seed"]
    assert not set(spec) - keys
