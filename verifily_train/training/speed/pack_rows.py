"""Each batch's real tokens as one packed sequence, attention re-padded by row (training/loss.py, model/attention.py).

On the label-only path, on the devices of ``loss.PACK_DEVICES`` (the CPU: a GPU step is bound by kernel
launches, which packing adds), with SDPA attention (the stage's attention function handles packed rows; in
fp32 it is SDPA for anything else), and not with compiled blocks.
"""

from __future__ import annotations

from verifily_train.training.loss import PACK_DEVICES
from verifily_train.training.speed.plan import Decision, Run

NAME = "pack_rows"
NEEDS = ("label_only_head",)
STAGE_ATTENTION = True


def eligible(run: Run, on: Decision) -> bool:
    return run.device in PACK_DEVICES and not on("compile_blocks") and run.sdpa
