"""The Trainer's per-step bookkeeping over what the step needs; long-lived objects out of the garbage collector.

The Trainer walks every parameter of the model, frozen ones included, two more times a step than the step
needs (its flop count and the gradient clipping); the values are the same. The objects alive before training
(the model's modules and parameters, the tokenizer, the rows) live through it, so they are frozen out of the
garbage collector (``gc.freeze``): the Trainer's own ``gc.collect`` at the start and the automatic full
collections during the steps walk only what training creates.
"""

from __future__ import annotations

import contextlib
import gc

from verifily_train.training.speed.plan import Decision, Run

NAME = "lean_steps"
NEEDS = ()


def eligible(run: Run, on: Decision) -> bool:
    return True


class MIXIN:
    """``floating_point_ops`` counted once a run; gradient clipping over the trainable parameters only."""

    def floating_point_ops(self, inputs):
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if getattr(self, "_flop_parameters", None) is None:  # fixed for the run: counted once
            self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._flop_parameters

    def _clip_grad_norm(self, model):
        if getattr(self, "_trainable", None) is None:  # frozen weights never hold a gradient
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)


@contextlib.contextmanager
def during_training():
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
