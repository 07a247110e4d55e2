"""LoRA's dropout masks from 16 random bits an element on the CPU (``BernoulliDropout``, model/lora.py).

Not with compiled blocks: they fuse ``nn.Dropout``'s own sampling, and the 16-bit sampler's in-place ``random_``
breaks their graph. The packed-row levers need its masks to follow the rows computed (``keeps`` of
``bucket_packed_tokens`` and ``trim_dead_tails``).
"""

from __future__ import annotations

from verifily_train.model import lora
from verifily_train.training.speed.plan import Decision, Run, SpeedPlan

NAME = "cpu_cheap_dropout"
NEEDS = ()


def eligible(run: Run, on: Decision) -> bool:
    return run.lora and run.device == "cpu" and not on("compile_blocks")


def on_adapter(model, plan: SpeedPlan) -> int:
    return lora.use_cheap_dropout(model)
