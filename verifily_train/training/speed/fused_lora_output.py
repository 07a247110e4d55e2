"""The LoRA adapter's output added inside one ``addmm`` (model/lora.py): one pass over a layer's output, not two."""

from __future__ import annotations

from verifily_train.model import lora
from verifily_train.training.speed.plan import Decision, Run, SpeedPlan

NAME = "fused_lora_output"
NEEDS = ()


def eligible(run: Run, on: Decision) -> bool:
    return run.lora


def on_adapter(model, plan: SpeedPlan) -> int:
    return lora.use_fused_lora_output(model)
