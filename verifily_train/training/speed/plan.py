"""The speed plan: which levers run, resolved once from the config, the device plan and the loaded base model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

from verifily_train.config.schema import TrainConfig
from verifily_train.model.device import DevicePlan
from verifily_train.model.loading import ModelSpec

LOW_PRECISIONS = ("bf16", "fp16")
Decision = Callable[[str], bool]  # another lever's decision, by name (what a lever's ``eligible`` may ask)


@dataclass(frozen=True)
class Levers:
    """The levers wanted: all by default (the train stage); benchmarks turn some off (``Levers(pack_rows=False)``).

    Each field is a wish; :func:`resolve` keeps those that apply to the run. The field names are the lever
    modules' names under training/speed/.
    """

    label_only_head: bool = True
    frozen_in_compute_dtype: bool = True
    cpu_fp32_attention: bool = True
    cpu_cheap_dropout: bool = True
    fused_lora_output: bool = True
    pack_rows: bool = True
    last_layer_at_labels: bool = True
    bucket_packed_tokens: bool = True
    trim_dead_tails: bool = True
    lean_steps: bool = True
    compile_blocks: Optional[bool] = None  # None: ``training.compile``


@dataclass(frozen=True)
class SpeedPlan:
    """The levers that run (the default: none, the plain path) and the precision they run under."""

    label_only_head: bool = False
    frozen_in_compute_dtype: bool = False
    cpu_fp32_attention: bool = False
    cpu_cheap_dropout: bool = False
    fused_lora_output: bool = False
    pack_rows: bool = False
    last_layer_at_labels: bool = False
    bucket_packed_tokens: bool = False
    trim_dead_tails: bool = False
    lean_steps: bool = False
    compile_blocks: bool = False
    precision: str = "fp32"

    def on(self, name: str) -> bool:
        return bool(getattr(self, name))

    def without(self, names: Iterable[str], levers: Sequence) -> "SpeedPlan":
        """This plan with ``names`` off, and every lever that needs one of them (``NEEDS``), transitively."""
        off = set(names)
        grew = True
        while grew:
            grew = False
            for lever in levers:
                if lever.NAME not in off and off.intersection(lever.NEEDS):
                    off.add(lever.NAME)
                    grew = True
        return dataclasses.replace(self, **{name: False for name in off})


@dataclass(frozen=True)
class Run:
    """The facts of one run the levers' eligibility reads (``model``: the loaded base model, before LoRA)."""

    device: str
    precision: str
    lora: bool
    quantized: bool
    kind: str
    compile_blocks: bool
    model: Any = field(compare=False, repr=False)

    @property
    def low_precision(self) -> bool:
        return self.precision in LOW_PRECISIONS

    @property
    def sdpa(self) -> bool:
        """The base model runs transformers' SDPA attention (the stage's attention function can replace it)."""
        return getattr(getattr(self.model, "config", None), "_attn_implementation", None) == "sdpa"


def run_facts(cfg: TrainConfig, device: DevicePlan, spec: ModelSpec, model, quantized: bool, wish: Levers) -> Run:
    compile_blocks = cfg.training.compile if wish.compile_blocks is None else wish.compile_blocks
    return Run(device.device, device.precision, cfg.lora.enabled, quantized, spec.kind, bool(compile_blocks), model)


def resolve(run: Run, wish: Levers, levers: Sequence) -> SpeedPlan:
    """Each lever wished for, whose ``NEEDS`` are on and that is ``eligible`` for ``run``: decided once each."""
    by_name = {lever.NAME: lever for lever in levers}
    decided: Dict[str, bool] = {}

    def on(name: str) -> bool:
        if name not in decided:
            lever = by_name[name]
            wanted = run.compile_blocks if name == "compile_blocks" else getattr(wish, name)
            decided[name] = bool(wanted and all(on(need) for need in lever.NEEDS) and lever.eligible(run, on))
        return decided[name]

    return SpeedPlan(**{lever.NAME: on(lever.NAME) for lever in levers}, precision=run.precision)

