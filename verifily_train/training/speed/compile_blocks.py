"""``torch.compile`` of the model's repeated decoder block (training/compiled.py); asked for by ``training.compile``.

Pays on long GPU runs, where a LoRA step is bound by the host launching kernels; on a CPU it does not
(docs/models.md). The packed-row levers and the 16-bit dropout sampler stay off with it.
"""

from __future__ import annotations

from verifily_train.training import compiled
from verifily_train.training.speed.plan import Decision, Run, SpeedPlan

NAME = "compile_blocks"
NEEDS = ()


def eligible(run: Run, on: Decision) -> bool:
    return True


def on_adapter(model, plan: SpeedPlan) -> int:
    return compiled.compile_repeated_blocks(model)
