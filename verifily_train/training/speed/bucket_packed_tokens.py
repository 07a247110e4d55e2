"""Packed rows padded to a multiple of a bucket under low precision, so row counts repeat (``loss.RowCounts``).

Low precision only: oneDNN builds its bf16 kernels per row count, fp32 (MKL) has no such cost; and only for
small models (``RowCounts.for_model``: above the size a padded token costs more than a kernel build saves). Never
with the label-rows last layer (fp32 only), whose dropout rows count every packed token. The padding rows must
draw no dropout bits, so that the masks and the random stream stay the plain packed path's: the model keeps it
only where every LoRA dropout follows the loss's row context (the 16-bit sampler does; torch's ``nn.Dropout``
does not), and not under gradient checkpointing, whose recomputed forward runs outside that context.
"""

from __future__ import annotations

from typing import Optional

from verifily_train.model import last_layer
from verifily_train.training.loss import RowCounts
from verifily_train.training.speed.plan import Decision, Run

NAME = "bucket_packed_tokens"
NEEDS = ("pack_rows",)


def eligible(run: Run, on: Decision) -> bool:
    return run.low_precision


def rows_follow(model) -> bool:
    """Every LoRA dropout of ``model`` draws through the loss's row context, and no forward is recomputed."""
    return last_layer.dropouts_follow_rows(model) and not getattr(model, "is_gradient_checkpointing", False)


def keeps(model, count: int) -> bool:
    return rows_follow(model)


def row_counts(model) -> Optional[RowCounts]:
    """The bucket for ``model`` (None: too large a model to pad)."""
    return RowCounts.for_model(model)
