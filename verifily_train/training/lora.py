"""Attach a LoRA adapter (PEFT) to a base model, or leave every weight trainable when LoRA is off."""

from __future__ import annotations

from verifily_train.config.schema import LoraSection
from verifily_train.errors import ConfigError
from verifily_train.training.models import KIND_CAUSAL, KIND_SEQ2SEQ, ModelSpec


def resolve_target_modules(lora: LoraSection, spec: ModelSpec):
    """``auto``: PEFT's mapping for the model type, else every linear layer except the output head."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    if lora.target_modules == "auto":
        return list(MAPPING[spec.model_type]) if spec.model_type in MAPPING else "all-linear"
    return lora.target_modules


def build_adapter(model, lora: LoraSection, spec: ModelSpec):
    """Wrap ``model`` with LoRA; for classification PEFT keeps the head trainable (modules_to_save)."""
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = {KIND_CAUSAL: TaskType.CAUSAL_LM, KIND_SEQ2SEQ: TaskType.SEQ_2_SEQ_LM}.get(spec.kind, TaskType.SEQ_CLS)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=resolve_target_modules(lora, spec), task_type=task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(None, "lora.target_modules", str(err).splitlines()[0]) from err


def count_parameters(model) -> tuple:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
