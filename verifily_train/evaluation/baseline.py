"""The baseline's model: the untuned base, loaded the way the run's adapter is evaluated on it.

A QLoRA adapter is scored on the base quantized to 4 or 8 bits; scoring the baseline on the fp32 base
would fold the quantization error into the "gain". So a quantized run's baseline goes through the very
same load path as the trained adapter (quantized base + ``PeftModel.from_pretrained``), with an adapter
whose weights are all zero: LoRA adds ``B @ A @ x`` to each adapted layer, which is then exactly zero.
"""

from __future__ import annotations

from pathlib import Path
from verifily_train.config.schema import LoraSection, TrainConfig
from verifily_train.model.lora import build_adapter
from verifily_train.model.loading import KIND_CAUSAL, KIND_SEQ2SEQ, ModelSpec

# Bump when the same plan should now give another baseline (the stage's code version does not list this file).
BASELINE_LOAD_VERSION = "baseline-load/1"
UNTRAINED_ADAPTER = "untrained-adapter"


def baseline_load_plan(lora: LoraSection) -> dict:
    """The quantization the baseline's base is loaded with: the training run's own (``none`` without LoRA)."""
    quantized = lora.enabled and lora.quantization != "none"
    return {"quantization": lora.quantization if quantized else "none",
            "bnb_4bit_compute_dtype": lora.bnb_4bit_compute_dtype if quantized and lora.quantization == "4bit"
            else None}


def baseline_key_parts(lora: LoraSection) -> tuple:
    """What the baseline stage's cache key adds for a quantized base; nothing for an unquantized one."""
    plan = baseline_load_plan(lora)
    return () if plan["quantization"] == "none" else (BASELINE_LOAD_VERSION, plan)


def write_untrained_adapter(cfg: TrainConfig, spec: ModelSpec, folder: Path) -> dict:
    """The run's LoRA configuration with all-zero weights in ``folder/untrained-adapter``; a train-stage-like manifest.

    Built on an empty (meta-device) copy of the model: no weights are read, whatever the model's size.
    """
    import torch
    from accelerate import init_empty_weights
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = {KIND_CAUSAL: AutoModelForCausalLM, KIND_SEQ2SEQ: AutoModelForSeq2SeqLM}[spec.kind]
    config = AutoConfig.from_pretrained(spec.source, trust_remote_code=cfg.trust_remote_code)
    with init_empty_weights():
        model = build_adapter(auto.from_config(config, trust_remote_code=cfg.trust_remote_code), cfg.lora, spec)
    target = folder / UNTRAINED_ADAPTER
    target.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(target))
    zeros = {name: torch.zeros(tensor.shape, dtype=torch.float32)
             for name, tensor in get_peft_model_state_dict(model).items()}
    save_file(zeros, str(target / "adapter_model.safetensors"))
    return {"adapter_dir": UNTRAINED_ADAPTER, "full_finetune": False}

