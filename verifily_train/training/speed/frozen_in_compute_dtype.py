"""Frozen linear weights held in the autocast dtype, so autocast stops re-casting them every forward (model/lora.py).

LoRA under bf16/fp16 autocast only, and not on a quantized base (its weights are not plain linears'). The matrix
products get the very same operands: the cast is done once instead of every step.
"""

from __future__ import annotations

from verifily_train.model import lora
from verifily_train.training.speed.plan import Decision, Run, SpeedPlan

NAME = "frozen_in_compute_dtype"
NEEDS = ()


def eligible(run: Run, on: Decision) -> bool:
    return run.lora and not run.quantized and run.low_precision


def on_adapter(model, plan: SpeedPlan) -> int:
    import torch

    return lora.store_frozen_linears_in(model, torch.bfloat16 if plan.precision == "bf16" else torch.float16)
