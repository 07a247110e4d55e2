"""Attention in fp32 on the CPU under bf16/fp16 autocast: the stage's attention function (model/attention.py).

PyTorch's low-precision CPU attention kernel is slower than its fp32 one, while the projections and MLP gain
from bf16: the model keeps both. Needs SDPA attention on the base model (the function replaces it).
"""

from __future__ import annotations

from verifily_train.training.speed.plan import Decision, Run

NAME = "cpu_fp32_attention"
NEEDS = ()
STAGE_ATTENTION = True


def eligible(run: Run, on: Decision) -> bool:
    return run.device == "cpu" and run.low_precision and run.sdpa
