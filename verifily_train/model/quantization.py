"""QLoRA / 8-bit loading through bitsandbytes (optional extra ``[qlora]``; imported lazily)."""

from __future__ import annotations

import importlib.util

from verifily_train.config.schema import LoraSection
from verifily_train.errors import EnvironmentProblem


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def quantization_config(lora: LoraSection, device: str):
    """A ``BitsAndBytesConfig`` for ``lora.quantization`` (NF4 + double quantization for 4-bit), or None."""
    if not lora.enabled or lora.quantization == "none":
        return None
    if not bitsandbytes_available():
        raise EnvironmentProblem(None, "lora.quantization",
                                 f"{lora.quantization} needs bitsandbytes: pip install 'verifily-train[qlora]'")
    if device == "mps":
        raise EnvironmentProblem(None, "lora.quantization",
                                 "bitsandbytes does not support Apple MPS; use quantization: none or device: cpu")
    import torch
    from transformers import BitsAndBytesConfig

    if lora.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = getattr(torch, lora.bnb_4bit_compute_dtype)
    if device == "cpu" and compute is torch.float16:
        compute = torch.float32  # fp16 kernels are CUDA-only
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def prepare_quantized(model):
    """``prepare_model_for_kbit_training`` plus the CPU 4-bit gradient trap workaround.

    On CPUs with AVX512-BF16, a ``Linear4bit`` run once in eval mode on an input without grad repacks
    its weights into an inference layout, after which no gradient flows through it (only a warning).
    An evaluation during training is enough. Turning that path off keeps LoRA training.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    disable_cpu_4bit_repacking(model)
    return model


def disable_cpu_4bit_repacking(model) -> int:
    """Set ``support_avx512bf16_for_cpu = False`` on every bitsandbytes 4-bit layer; returns how many."""
    if not bitsandbytes_available():
        return 0
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
