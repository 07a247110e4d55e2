"""The output head only where a label is: the loss computed at label positions alone (training/loss.py).

Eligible for a CausalLM whose family's registry entry says its forward is exactly
``lm_head(decoder(...).last_hidden_state)`` (model/registry.py), outside DDP ranks: their forward goes through
DDP's wrapper, which this path does not call. Training only: evaluation needs the logits and takes the plain path.
"""

from __future__ import annotations

from verifily_train.model.loading import KIND_CAUSAL
from verifily_train.training.loss import label_position_loss, supports_label_only_head
from verifily_train.training.ranks import in_launched_rank
from verifily_train.training.speed.plan import Decision, Run

NAME = "label_only_head"
NEEDS = ()


def eligible(run: Run, on: Decision) -> bool:
    return run.kind == KIND_CAUSAL and supports_label_only_head(run.model) and not in_launched_rank()


class MIXIN:
    """``Trainer.compute_loss`` on the label-only path while training; anything else is the Trainer's own.

    Reads the trainer's ``speed_plan`` (packed rows, dead tails), ``packed_row_counts`` and
    ``loss_denominator`` (a constant over length-grouped batches, else the Trainer's ``num_items_in_batch``).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not return_outputs and model.training and "labels" in inputs:
            denominator = self.loss_denominator if self.loss_denominator is not None else num_items_in_batch
            # accelerate autocasts by patching model.forward, which this path does not call
            with self.accelerator.autocast():
                return label_position_loss(model, inputs, denominator, pack=self.speed_plan.pack_rows,
                                           pad_to=self.packed_row_counts, trim=self.speed_plan.trim_dead_tails)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
