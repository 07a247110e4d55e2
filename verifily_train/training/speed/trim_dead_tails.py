"""Packed rows without the positions after each row's last label-reading one (``loss.dead_tails``).

The cut tails must still draw their dropout bits, so that the masks and the random stream stay the uncut
path's: kept only where every LoRA dropout follows the loss's row context, as for ``bucket_packed_tokens``.
"""

from __future__ import annotations

from verifily_train.training.speed.bucket_packed_tokens import rows_follow
from verifily_train.training.speed.plan import Decision, Run

NAME = "trim_dead_tails"
NEEDS = ("pack_rows",)


def eligible(run: Run, on: Decision) -> bool:
    return True


def keeps(model, count: int) -> bool:
    return rows_follow(model)
