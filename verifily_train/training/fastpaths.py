"""The train stage's exact speed levers, resolved once into one plan (``FastPaths``) and applied to the model.

Every lever computes what the plain path computes (tests/test_training_speed.py checks each one against
it); what a lever needs (a device, a precision, LoRA, a model family, SDPA attention) is decided here,
once, from the config, the device plan and the loaded model. Benchmarks turn levers off by passing a
``FastPaths`` with fields set to False (bench/ours.py); the train stage itself uses the defaults.
docs/benchmarks.md has each lever's measurement.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from verifily_train.config.schema import TrainConfig
from verifily_train.model import attention, last_layer, lora
from verifily_train.model.device import DevicePlan
from verifily_train.model.loading import KIND_CAUSAL, ModelSpec
from verifily_train.training import compiled
from verifily_train.training.loss import PACK_DEVICES, supports_label_only_head
from verifily_train.training.ranks import in_launched_rank

LOW_PRECISIONS = ("bf16", "fp16")


@dataclass(frozen=True)
class FastPaths:
    """Which levers run. As asked for, every field is a wish; :meth:`resolve` keeps those that apply."""

    label_only_head: bool = True  # CausalLMs of training.loss's families: the head only where a label is (loss.py)
    frozen_in_compute_dtype: bool = True  # LoRA under bf16/fp16 autocast: frozen weights held in that dtype (lora.py)
    cpu_fp32_attention: bool = True  # CPU under bf16/fp16 autocast: attention in fp32 (model/attention.py)
    cpu_cheap_dropout: bool = True  # LoRA on the CPU: dropout masks from 16 random bits an element (lora.py)
    fused_lora_output: bool = True  # LoRA: the adapter's output added inside one addmm (lora.py)
    pack_rows: bool = True  # label-only head on a CPU: each batch's real tokens as one packed sequence (loss.py)
    last_layer_at_labels: bool = True  # packed fp32 rows: the last decoder layer only where a label is (model/last_layer.py)
    bucket_packed_tokens: bool = True  # packed rows under CPU bf16/fp16 autocast: padded to a row count already run (loss.py)
    trim_dead_tails: bool = True  # packed rows: positions after a row's last label-reading one not computed (loss.py)
    lean_steps: bool = True  # Trainer bookkeeping over trainable parameters only, long-lived objects out of gc (trainer.py)
    compile_blocks: Optional[bool] = None  # torch.compile of the repeated decoder block; None: training.compile

    def resolve(self, cfg: TrainConfig, plan: DevicePlan, spec: ModelSpec, model, quantized: bool) -> "FastPaths":
        """The levers that apply to this run (``model``: the loaded base model, before LoRA)."""
        use_lora = cfg.lora.enabled
        compile_blocks = cfg.training.compile if self.compile_blocks is None else self.compile_blocks
        low = plan.precision in LOW_PRECISIONS
        sdpa = getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"
        label_only = (self.label_only_head and spec.kind == KIND_CAUSAL and supports_label_only_head(model)
                      and not in_launched_rank())  # DDP ranks take the plain forward: it goes through DDP's wrapper
        # the stage's attention function handles packed rows; in fp32 it is SDPA for anything else
        pack = self.pack_rows and label_only and plan.device in PACK_DEVICES and not compile_blocks and sdpa
        return FastPaths(
            label_only_head=label_only,
            frozen_in_compute_dtype=self.frozen_in_compute_dtype and use_lora and not quantized and low,
            cpu_fp32_attention=self.cpu_fp32_attention and plan.device == "cpu" and low and sdpa,
            # compiled blocks fuse nn.Dropout's own sampling; the 16-bit sampler's in-place random_ breaks their graph
            cpu_cheap_dropout=self.cpu_cheap_dropout and use_lora and plan.device == "cpu" and not compile_blocks,
            fused_lora_output=self.fused_lora_output and use_lora,
            pack_rows=pack,
            # fp32 only: under bf16 autocast it measured 0.98x (model/last_layer.py)
            last_layer_at_labels=self.last_layer_at_labels and pack and not low and last_layer.supports(model),
            # low precision only: oneDNN builds its bf16 kernels per row count, fp32 (MKL) has no such cost;
            # never with the label-rows last layer (fp32 only), whose dropout rows count every packed token
            bucket_packed_tokens=self.bucket_packed_tokens and pack and low,
            trim_dead_tails=self.trim_dead_tails and pack,
            lean_steps=self.lean_steps,
            compile_blocks=bool(compile_blocks),
        )


@dataclass(frozen=True)
class AppliedPaths:
    """What applying a resolved plan changed in the model (the stage manifest reports it)."""

    paths: FastPaths
    frozen_linears_in_compute_dtype: int = 0
    cheap_dropout_layers: int = 0
    fused_lora_output_layers: int = 0
    compiled_blocks: int = 0
    label_rows_last_layers: int = 0


def switch_attention(model, paths: FastPaths) -> FastPaths:
    """Give the base model the stage's attention function where the plan needs it (before LoRA wraps it)."""
    if not (paths.cpu_fp32_attention or paths.pack_rows):
        return paths
    if attention.use_fp32_attention(model):
        return paths
    return dataclasses.replace(paths, cpu_fp32_attention=False, pack_rows=False, last_layer_at_labels=False,
                               bucket_packed_tokens=False, trim_dead_tails=False)


def apply_to_adapter(model, paths: FastPaths, precision: str) -> AppliedPaths:
    """The levers that change the LoRA-wrapped model's layers, in the order they must run."""
    import torch  # heavy: the stage has it loaded by now

    converted = cheap = fused = blocks = label_rows = 0
    if paths.frozen_in_compute_dtype:
        converted = lora.store_frozen_linears_in(model, torch.bfloat16 if precision == "bf16" else torch.float16)
    if paths.cpu_cheap_dropout:
        cheap = lora.use_cheap_dropout(model)
    if paths.fused_lora_output:
        fused = lora.use_fused_lora_output(model)
    if paths.compile_blocks:
        blocks = compiled.compile_repeated_blocks(model)
    if paths.last_layer_at_labels:  # after the dropout swap: it checks that the layer's dropouts follow rows
        label_rows = last_layer.use_label_rows_last_layer(model)
    # the bucket's padding tokens must draw no dropout bits, and the cut dead tails must still draw theirs, so
    # that the masks and the random stream stay the plain packed path's: the 16-bit sampler follows the loss's
    # row context; torch's nn.Dropout would not. Nor under gradient checkpointing, whose recomputed forward
    # runs outside that context.
    rows_follow = last_layer.dropouts_follow_rows(model) and not getattr(model, "is_gradient_checkpointing", False)
    return AppliedPaths(dataclasses.replace(paths, last_layer_at_labels=bool(label_rows),
                                            bucket_packed_tokens=paths.bucket_packed_tokens and rows_follow,
                                            trim_dead_tails=paths.trim_dead_tails and rows_follow),
                        converted, cheap, fused, blocks, label_rows)
