"""The train stage: HF Trainer (or Seq2SeqTrainer) + PEFT on tokenized splits, writing a safetensors adapter.

``train_adapter`` reads top-down: load the model, resolve the speed plan once (``speed.plan``, training/speed/)
and apply it with the adapter (``speed.apply``), order the rows, build the Trainer from the applied plan, train
(resuming from the last complete checkpoint), save, and return the stage manifest.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import List, Optional

import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from verifily_train.config.schema import TrainConfig, trackers
from verifily_train.errors import translate_os_error
from verifily_train.model.collate import make_collator
from verifily_train.model.device import DevicePlan
from verifily_train.model.loading import KIND_SEQ2SEQ, KIND_SEQ_CLS, ModelSpec, load_model
from verifily_train.model.lora import build_adapter, count_parameters
from verifily_train.model.quantization import prepare_quantized, quantization_config
from verifily_train.model.registry import family
from verifily_train.model.tokenize import TokenizedSplit
from verifily_train.quiet import progress_bars
from verifily_train.training.batching import KeyedOrderSampler, LengthGroupedSampler, padding_fraction, row_keys
from verifily_train.training.callbacks import ReportProgress, StepProgress
from verifily_train.training.checkpoints import MarkCompleteCheckpoints, last_complete_checkpoint
from verifily_train.training.distributed import launch_ranks
from verifily_train.training import speed
from verifily_train.training.loss import group_cost_for, length_groups
from verifily_train.training.outputs import save_trained
from verifily_train.training.ranks import ddp_backend, in_launched_rank, is_main_rank, local_device_index
from verifily_train.training.snapshots import snapshot_callbacks


def _trainer_class(base_cls, sampler, applied: speed.Applied, denominator: Optional[float]):
    """``base_cls`` with our training sampler and the Trainer mixins of the speed levers that run.

    ``denominator`` (with length-grouped batches): divide each batch's summed token loss by this
    constant, the epoch's mean label tokens per optimizer step, instead of by the batch's own count.
    A batch of short rows then weighs what its tokens weigh, as in a random batch: dividing by its own
    small count would up-weight short rows' tokens (worse held-out loss: docs/models.md, "Speed levers").
    """

    class VerifilyTrainer(*speed.trainer_mixins(applied.plan), base_cls):
        speed_plan = applied.plan
        packed_row_counts = applied.row_counts  # CPU bf16: how packed lengths are padded (training.loss.RowCounts)
        loss_denominator = denominator  # the label-only loss's (None: the Trainer's num_items_in_batch)

        if denominator is not None:
            loss_is_scaled_for_ga = True  # the constant already covers gradient accumulation

        def _get_train_sampler(self, train_dataset=None):
            if sampler is not None and (train_dataset is None or train_dataset is self.train_dataset):
                return sampler
            return super()._get_train_sampler(train_dataset)

    return VerifilyTrainer


def label_tokens_per_step(labels: List[List[int]], cfg: TrainConfig) -> float:
    """Mean next-token targets (labels other than -100 after the shift) per optimizer step over the epoch."""
    targets = sum(sum(1 for x in row[1:] if x != -100) for row in labels)
    t = cfg.training
    return max(targets / max(len(labels), 1), 1e-6) * t.batch_size * t.gradient_accumulation_steps


def data_order_seed(cfg: TrainConfig) -> int:
    """The seed of the training rows' order: ``training.data_order_seed`` when set, else the run's seed."""
    return cfg.training.data_order_seed if cfg.training.data_order_seed >= 0 else cfg.seed


def training_arguments(cfg: TrainConfig, plan: DevicePlan, checkpoint_dir: Path, has_val: bool, seq2seq: bool):
    """TrainingArguments from the config's sections (spec §8 names mapped to HF names)."""
    t = cfg.training
    cls = Seq2SeqTrainingArguments if seq2seq else TrainingArguments
    return cls(
        output_dir=str(checkpoint_dir),
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_val else "no",
        eval_steps=t.eval_steps,
        seed=cfg.seed,
        data_seed=data_order_seed(cfg),
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=plan.device == "cpu",
        report_to=list(trackers(t)),
        dataloader_num_workers=cfg.runtime.num_workers,
        disable_tqdm=not progress_bars(cfg.runtime.progress),
        remove_unused_columns=False,
        ddp_backend=ddp_backend(plan.device),
        # LoRA uses every trainable weight in each forward: skip DDP's per-step search for unused ones
        ddp_find_unused_parameters=False if cfg.lora.enabled else None,
    )


def load_for_training(cfg: TrainConfig, spec: ModelSpec, tok, labels, plan: DevicePlan):
    """(base model ready for the adapter, whether it is quantized); seeded first: a fresh head draws from it."""
    set_seed(cfg.seed)  # before the model is built: LoRA init and a fresh classification head draw from it
    quant = quantization_config(cfg.lora, plan.device)
    device_map = None
    if quant is not None:
        device_map = {"": plan.device if plan.device != "cuda" else local_device_index()}
    model = load_model(spec, labels=labels or None, pad_token_id=tok.pad_token_id,
                       trust_remote_code=cfg.trust_remote_code, quantization_config=quant, device_map=device_map)
    return (prepare_quantized(model) if quant is not None else model), quant is not None


def training_order(cfg: TrainConfig, train_data: TokenizedSplit, spec: ModelSpec, label_only: bool):
    """(sampler, loss denominator or None): a row-keyed shuffle, or length-grouped batches when asked for.

    Grouping by length is exact in weight only where each token's share of the loss can be kept: CausalLMs
    on the label-only path (constant denominator) and classification (one label per row).
    """
    keys = row_keys(train_data.columns["row_hash"])
    if cfg.training.group_by_length and (label_only or spec.kind == KIND_SEQ_CLS):
        sampler = LengthGroupedSampler([len(ids) for ids in train_data.columns["input_ids"]],
                                       cfg.training.batch_size, data_order_seed(cfg), keys)
        return sampler, label_tokens_per_step(train_data.columns["labels"], cfg) if label_only else None
    # rows ordered by a keyed hash: an arm without some rows sees the others in the same order (attribution);
    # under DDP accelerate deals its batches out to the ranks, so a step sees the one-process batch
    return KeyedOrderSampler(keys, data_order_seed(cfg)), None


def build_trainer(cfg: TrainConfig, spec: ModelSpec, tok, model, plan: DevicePlan, applied: speed.Applied,
                  train_data: TokenizedSplit, val_data: Optional[TokenizedSplit], checkpoints: Path, on_progress,
                  out_dir: Path, work_dir: Path):
    """The HF Trainer for this run, built from the resolved plan, with the stage's callbacks."""
    seq2seq = spec.kind == KIND_SEQ2SEQ
    sampler, denominator = training_order(cfg, train_data, spec, applied.plan.label_only_head)
    trainer_cls = _trainer_class(Seq2SeqTrainer if seq2seq else Trainer, sampler, applied, denominator)
    trainer = trainer_cls(model=model, args=training_arguments(cfg, plan, checkpoints, val_data is not None, seq2seq),
                          train_dataset=train_data, eval_dataset=val_data, data_collator=make_collator(spec, tok),
                          processing_class=tok)
    trainer.add_callback(MarkCompleteCheckpoints())
    for callback in snapshot_callbacks(cfg.training.attribution_snapshots, out_dir, work_dir,  # attribute --rows
                                       optimizer=lambda: trainer.optimizer):
        trainer.add_callback(callback)
    if on_progress is not None:
        trainer.add_callback(ReportProgress(on_progress))
    if progress_bars(cfg.runtime.progress):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(StepProgress)
    else:  # no bar, and no printed dict per log either: the loss history is in trainer_log.jsonl and the summary
        trainer.remove_callback(PrinterCallback)
    return trainer


def run_training(trainer, checkpoints: Path, speed_plan: speed.SpeedPlan):
    """(train output, seconds, CPU seconds, checkpoint resumed from or None); a full disk becomes one user error."""
    resume = last_complete_checkpoint(checkpoints)
    with speed.during_training(speed_plan):
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except Exception as err:  # OSError, torch's RuntimeError, safetensors' SafetensorError: a full disk is one line
            problem = translate_os_error(err, checkpoints, "while writing a checkpoint")
            if problem is not None:
                raise problem from err
            raise
    return result, time.perf_counter() - started, time.process_time() - cpu_started, resume


def train_adapter(cfg: TrainConfig, spec: ModelSpec, tok, tokenized: dict, tokenized_dir: Path, plan: DevicePlan,
                  out_dir: Path, work_dir: Path, on_progress=None, fast: speed.Levers = speed.Levers()) -> dict:
    """Train and save ``adapter/`` (or ``model/`` for a full fine-tune); returns the stage manifest.

    Checkpoints go to ``work_dir/checkpoints`` every ``save_steps``; when a complete one is there (a
    killed or failed earlier attempt with the same key), training resumes from it, RNG state included.
    With ``plan.num_processes > 1`` this relaunches itself as that many DDP ranks (training/distributed.py).
    ``fast``: the speed levers wanted (all by default; benchmarks turn some off), resolved once for this run
    (``speed.plan``) and applied with the adapter (``speed.apply``).
    ``on_progress(step, max_steps)`` is called as optimizer steps complete.
    """
    if plan.num_processes > 1 and not in_launched_rank():
        return launch_ranks(cfg, spec, tokenized, tokenized_dir, plan, out_dir, work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = tokenized["labels"]
    model, quantized = load_for_training(cfg, spec, tok, labels, plan)
    # the plan as the model took it: a lever may go off while applied (for the adapter's dropout, say)
    model, applied = speed.apply(speed.plan(cfg, plan, spec, model, quantized, fast), model,
                                 adapt=(lambda base: build_adapter(base, cfg.lora, spec)) if cfg.lora.enabled else None)
    trainable, total = count_parameters(model)
    tok.padding_side = family(spec.model_type).padding_side  # the loss masks padding anyway
    train_data = TokenizedSplit(tokenized_dir / tokenized["splits"]["train"]["file"], cfg.task)
    val_info = tokenized["splits"].get("val")
    val_data = TokenizedSplit(tokenized_dir / val_info["file"], cfg.task) if val_info else None
    checkpoints = work_dir / "checkpoints"
    trainer = build_trainer(cfg, spec, tok, model, plan, applied, train_data, val_data, checkpoints, on_progress,
                            out_dir, work_dir)
    result, seconds, cpu_seconds, resume = run_training(trainer, checkpoints, applied.plan)
    adapter_name = "adapter" if cfg.lora.enabled else "model"
    merged_name = "model" if cfg.lora.enabled and not cfg.output.save_adapter_only else None
    if is_main_rank():  # under DDP every rank holds the same weights: rank 0 writes them
        save_trained(model, tok, labels, cfg, spec, out_dir, bool(applied.count("frozen_in_compute_dtype")),
                     trainer.state.log_history)
    return stage_manifest(cfg, plan, trainer, result, (seconds, cpu_seconds), resume, train_data, applied, trainable,
                          total, adapter_name, merged_name)


def stage_manifest(cfg: TrainConfig, plan: DevicePlan, trainer, result, timing: tuple, resume: Optional[Path],
                   train_data: TokenizedSplit, applied: speed.Applied, trainable: int, total: int, adapter_name: str,
                   merged_name: Optional[str]) -> dict:
    """The train stage's manifest: what ran (the resolved levers included), how long, how many tokens."""
    levers = applied.plan
    seconds, cpu_seconds = timing
    tokens_per_epoch = sum(len(ids) for ids in train_data.columns["input_ids"])
    epochs_done = float(trainer.state.epoch or 0.0)
    train_tokens = int(round(tokens_per_epoch * epochs_done))
    train_loss = float(result.training_loss)
    return {
        "stage": "train",
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else None,
        "adapter_dir": adapter_name,
        "merged_dir": merged_name,
        "full_finetune": not cfg.lora.enabled,
        "log": "trainer_log.jsonl",
        "device": plan.device,
        "precision": plan.precision,
        "train_loss": train_loss if math.isfinite(train_loss) else None,
        "global_step": int(trainer.state.global_step),
        "epochs": epochs_done,
        "train_tokens": train_tokens,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,  # this process's CPU time (all threads): on a shared machine, its own work
        "tokens_per_second": train_tokens / seconds if seconds > 0 else None,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "threads": torch.get_num_threads(),
        "num_processes": plan.num_processes,
        "label_only_head": levers.label_only_head,
        "frozen_linears_in_compute_dtype": applied.count("frozen_in_compute_dtype"),
        "fp32_attention": levers.cpu_fp32_attention,
        "cheap_dropout_layers": applied.count("cpu_cheap_dropout"),
        "fused_lora_output_layers": applied.count("fused_lora_output"),
        "compiled_blocks": applied.count("compile_blocks"),
        "label_rows_last_layers": applied.count("last_layer_at_labels"),
        "packed_rows": levers.pack_rows,
        "packed_row_counts": trainer.packed_row_counts.describe() if getattr(trainer, "packed_row_counts", None) else None,
        "dead_tails_cut": levers.trim_dead_tails,
        "lean_steps": levers.lean_steps,
        "padding_fraction": 0.0 if levers.pack_rows else computed_padding(train_data, trainer, cfg, levers, plan),
    }


def computed_padding(train_data: TokenizedSplit, trainer, cfg: TrainConfig, levers: speed.SpeedPlan,
                     plan: DevicePlan) -> float:
    """Share of computed positions that are padding over the first epoch's batches (as the loss runs them)."""
    lengths = [len(ids) for ids in train_data.columns["input_ids"]]
    sampler = trainer._get_train_sampler()  # the stage's own sampler (VerifilyTrainer)
    order = sampler.order(sampler.seed)  # the first epoch's
    cost = group_cost_for(plan.device, plan.precision)
    split = levers.label_only_head and cost is not None
    groups = (lambda batch: length_groups(batch, cost)) if split else None
    return round(padding_fraction(lengths, order, cfg.training.batch_size, groups), 4)
