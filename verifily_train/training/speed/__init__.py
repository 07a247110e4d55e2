"""The train stage's exact speed levers: one plan resolved once from (config, device, model), applied in one place.

Every lever computes what the plain path computes (tests/test_training_speed.py checks each one against it);
docs/models.md ("Speed levers") says what each does and what it measured. Each lever is one module here,
named as its ``SpeedPlan`` field, declaring:

- ``NEEDS``: the levers it builds on (off, or withdrawn while applying, take it off too);
- ``eligible(run, on)``: when it applies, from the run's facts (``plan.Run``) and other levers' decisions;
- optionally how it is applied: ``STAGE_ATTENTION`` (it runs through the stage's attention function, switched
  on the base model before LoRA wraps it), ``on_adapter(model, plan)`` (changes the adapted model's layers,
  returns how many), ``keeps(model, count)`` (whether the model could take it, once every lever is applied),
  ``MIXIN`` (the Trainer methods it overrides), ``during_training()`` (a context around ``trainer.train``).

The trainer asks the applied plan (``Applied.plan``), never the config or the device, which levers run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from verifily_train.config.schema import TrainConfig
from verifily_train.model import attention
from verifily_train.model.device import DevicePlan
from verifily_train.model.loading import ModelSpec
from verifily_train.training.loss import RowCounts
from verifily_train.training.speed import (bucket_packed_tokens, compile_blocks, cpu_cheap_dropout, cpu_fp32_attention,
                                           frozen_in_compute_dtype, fused_lora_output, label_only_head,
                                           last_layer_at_labels, lean_steps, pack_rows, trim_dead_tails)
from verifily_train.training.speed.plan import Levers, Run, SpeedPlan, resolve, run_facts

__all__ = ["LEVERS", "Applied", "Levers", "Run", "SpeedPlan", "apply", "apply_to_adapter", "during_training", "plan",
           "trainer_mixins"]

# in the order they are applied (the adapter's layers: weights' dtype, dropout, fused output, compile, last layer)
LEVERS = (label_only_head, cpu_fp32_attention, pack_rows, frozen_in_compute_dtype, cpu_cheap_dropout,
          fused_lora_output, compile_blocks, last_layer_at_labels, bucket_packed_tokens, trim_dead_tails, lean_steps)


@dataclass(frozen=True)
class Applied:
    """The plan as the model took it, what applying it changed (layers per lever), and the packed rows' bucket."""

    plan: SpeedPlan
    layers: Dict[str, int] = field(default_factory=dict)
    row_counts: Optional[RowCounts] = None  # bucket_packed_tokens: how packed lengths are padded (None: not padded)

    def count(self, name: str) -> int:
        return self.layers.get(name, 0)


def plan(cfg: TrainConfig, device: DevicePlan, spec: ModelSpec, model, quantized: bool = False,
         wish: Levers = Levers()) -> SpeedPlan:
    """The levers that apply to this run (``model``: the loaded base model, before LoRA), decided once."""
    return resolve(run_facts(cfg, device, spec, model, quantized, wish), wish, LEVERS)


def apply(speed_plan: SpeedPlan, model, adapt: Optional[Callable] = None) -> Tuple[object, Applied]:
    """(the model to train, what was applied): the base model's attention, then ``adapt`` (LoRA), then its layers."""
    speed_plan = _switch_attention(speed_plan, model)
    if adapt is not None:
        model = adapt(model)
    return model, apply_to_adapter(speed_plan, model)


def _switch_attention(speed_plan: SpeedPlan, model) -> SpeedPlan:
    """The stage's attention function for the levers that run through it; they go off if the model refuses it."""
    users = [lever.NAME for lever in LEVERS if getattr(lever, "STAGE_ATTENTION", False) and speed_plan.on(lever.NAME)]
    if not users or attention.use_fp32_attention(model):
        return speed_plan
    return speed_plan.without(users, LEVERS)


def apply_to_adapter(speed_plan: SpeedPlan, model) -> Applied:
    """The levers that change the (LoRA-wrapped) model's layers, in order; those the model cannot take go off."""
    layers = {lever.NAME: lever.on_adapter(model, speed_plan) for lever in LEVERS
              if hasattr(lever, "on_adapter") and speed_plan.on(lever.NAME)}
    refused = [lever.NAME for lever in LEVERS if hasattr(lever, "keeps") and speed_plan.on(lever.NAME)
               and not lever.keeps(model, layers.get(lever.NAME, 0))]
    final = speed_plan.without(refused, LEVERS)
    row_counts = bucket_packed_tokens.row_counts(model) if final.bucket_packed_tokens else None
    return Applied(final, layers, row_counts)


def trainer_mixins(speed_plan: SpeedPlan) -> tuple:
    """The Trainer mixins of the levers that run (before the Trainer class in its bases)."""
    return tuple(lever.MIXIN for lever in LEVERS if hasattr(lever, "MIXIN") and speed_plan.on(lever.NAME))


@contextlib.contextmanager
def during_training(speed_plan: SpeedPlan):
    """The contexts the running levers hold around ``trainer.train``."""
    with contextlib.ExitStack() as stack:
        for lever in LEVERS:
            if hasattr(lever, "during_training") and speed_plan.on(lever.NAME):
                stack.enter_context(lever.during_training())
        yield
