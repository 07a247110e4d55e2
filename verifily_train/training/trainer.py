"""The train stage: HF Trainer (or Seq2SeqTrainer) + PEFT on tokenized splits, writing a safetensors adapter."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import List, Optional

from verifily_train.config.schema import TrainConfig
from verifily_train.model.device import DevicePlan
from verifily_train.training.distributed import (barrier, ddp_backend, in_launched_rank, is_main_rank, launch_ranks,
                                                 local_device_index, rank_callbacks)
from verifily_train.training.loss import PACK_DEVICES, supports_label_only_head, unwrap_causal_lm
from verifily_train.model.loading import KIND_CAUSAL, KIND_SEQ2SEQ, KIND_SEQ_CLS, ModelSpec, load_model
from verifily_train.model.tokenize import TokenizedSplit
from verifily_train.training.snapshots import snapshot_callbacks

COMPLETE_MARKER = ".verifily-complete"


def make_collator(spec: ModelSpec, tok):
    """Dynamic padding to the longest row of each batch (never to max_seq_length); labels pad with -100."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if spec.kind == KIND_SEQ_CLS:
        return DataCollatorWithPadding(tok, padding=True)
    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)


def _progress_callback_class():
    from transformers.trainer_callback import ProgressCallback

    class StepProgress(ProgressCallback):
        """One bar for training steps with the latest loss on it, instead of a printed dict per log."""

        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description("train")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs:
                shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "eval_loss") and isinstance(v, float)}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)

    return ProgressCallback, StepProgress


def _checkpoint_marker_class():
    from transformers import TrainerCallback

    class MarkCompleteCheckpoints(TrainerCallback):
        """Mark a checkpoint complete once the Trainer has written all of it (a kill mid-save leaves no mark)."""

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            barrier()  # under DDP every rank writes its own RNG state into the folder: mark it after all have
            if folder.is_dir() and is_main_rank():
                (folder / COMPLETE_MARKER).write_text(str(state.global_step))

    return MarkCompleteCheckpoints


def _progress_hook_class():
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        """Tell the caller how many optimizer steps are done (at most once a second, and at the end)."""

        def __init__(self, hook):
            self.hook, self.last = hook, 0.0

        def on_step_end(self, args, state, control, **kwargs):
            now = time.monotonic()
            if now - self.last >= 1.0 or state.global_step >= state.max_steps:
                self.last = now
                self.hook(state.global_step, state.max_steps)

    return ReportProgress


def last_complete_checkpoint(root: Path) -> Optional[Path]:
    """The highest-step checkpoint carrying the completion mark; partial ones are deleted."""
    import shutil

    if not root.is_dir():
        return None
    best = None
    for folder in root.glob("checkpoint-*"):
        try:
            step = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        if not (folder / COMPLETE_MARKER).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # written by a run killed mid-save
            continue
        if best is None or step > best[0]:
            best = (step, folder)
    return best[1] if best else None


def _trainer_class(base_cls, sampler, label_only_head: bool, loss_denominator: Optional[float], pack_rows: bool = False):
    """``base_cls`` with our training sampler and, for supported CausalLMs, the label-position loss.

    ``loss_denominator`` (with length-grouped batches): divide each batch's summed token loss by this
    constant, the epoch's mean label tokens per optimizer step, instead of by the batch's own count.
    A batch of short rows then weighs what its tokens weigh, as in a random batch: dividing by its own
    small count would up-weight short rows' tokens (measured: 2% worse held-out loss on the bench data).
    """
    from verifily_train.training.loss import label_position_loss

    class VerifilyTrainer(base_cls):
        if loss_denominator is not None:
            loss_is_scaled_for_ga = True  # the constant already covers gradient accumulation

        def _get_train_sampler(self, train_dataset=None):
            if sampler is not None and (train_dataset is None or train_dataset is self.train_dataset):
                return sampler
            return super()._get_train_sampler(train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # evaluation needs the logits (and takes the plain path); training only needs the loss
            if label_only_head and not return_outputs and model.training and "labels" in inputs:
                denominator = loss_denominator if loss_denominator is not None else num_items_in_batch
                # accelerate autocasts by patching model.forward, which this path does not call
                with self.accelerator.autocast():
                    return label_position_loss(model, inputs, denominator, pack=pack_rows)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

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
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

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
        report_to=[] if t.report_to == "none" else [t.report_to],
        dataloader_num_workers=cfg.runtime.num_workers,
        disable_tqdm=not cfg.runtime.progress,
        remove_unused_columns=False,
        ddp_backend=ddp_backend(plan.device),
        # LoRA uses every trainable weight in each forward: skip DDP's per-step search for unused ones
        ddp_find_unused_parameters=False if cfg.lora.enabled else None,
    )


def _normalize_adapter_config(path: Path) -> None:
    """PEFT writes target_modules from a set, in hash-seed order: sort it so identical runs give identical bytes."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_log(history: List[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for entry in history:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")


def train_adapter(cfg: TrainConfig, spec: ModelSpec, tok, tokenized: dict, tokenized_dir: Path, plan: DevicePlan,
                  out_dir: Path, work_dir: Path, on_progress=None, label_only_head: bool = True,
                  frozen_in_compute_dtype: bool = True, cpu_fp32_attention: bool = True,
                  cpu_cheap_dropout: bool = True, fused_lora_output: bool = True,
                  compile_blocks: Optional[bool] = None, pack_rows: bool = True) -> dict:
    """Train and save ``adapter/`` (or ``model/`` for a full fine-tune); returns the stage manifest.

    Checkpoints go to ``work_dir/checkpoints`` every ``save_steps``; when a complete one is there (a
    killed or failed earlier attempt with the same key), training resumes from it, RNG state included.
    With ``plan.num_processes > 1`` this relaunches itself as that many DDP ranks (training/distributed.py).
    ``label_only_head`` (CausalLMs of the families in ``training.loss``) applies the output head only at
    positions that carry a label; False runs the model's plain forward (benchmarks compare the two).
    DDP ranks always take the plain forward: it goes through the DistributedDataParallel wrapper.
    ``frozen_in_compute_dtype`` (LoRA under bf16/fp16 autocast, no quantization): frozen linear weights are
    stored in the autocast dtype instead of being cast on every forward (``lora.store_frozen_linears_in``).
    ``cpu_fp32_attention`` (CPU under bf16/fp16 autocast, SDPA models): attention runs in fp32
    (``training.attention``), where this CPU's kernel is several times faster than its bf16 one.
    ``cpu_cheap_dropout`` (LoRA on the CPU): LoRA's dropout masks come from 16 random bits per element
    (``lora.use_cheap_dropout``: same distribution, cheaper sampler, other masks than ``nn.Dropout``).
    ``fused_lora_output`` (LoRA): each adapted layer adds its scaled adapter output inside one ``addmm``
    (``lora.use_fused_lora_output``: the same sum, two fewer passes over the layer's output).
    ``compile_blocks`` (default: ``training.compile``): ``torch.compile`` the repeated decoder block
    (``training.compiled``).
    ``pack_rows`` (the label-only path on a CPU, SDPA models, not compiled): each batch's real tokens run
    as one packed sequence, attention re-padded by row (``loss._packed_label_loss_sum``): no padding
    computed outside attention.
    """
    if plan.num_processes > 1 and not in_launched_rank():
        return launch_ranks(cfg, spec, tokenized, tokenized_dir, plan, out_dir, work_dir)
    import torch
    from transformers import Seq2SeqTrainer, Trainer, set_seed

    from verifily_train.model.lora import build_adapter, count_parameters

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = tokenized["labels"]
    # seed before the model is built: LoRA init and a fresh classification head draw from it
    set_seed(cfg.seed)
    from verifily_train.model.quantization import prepare_quantized, quantization_config

    quant = quantization_config(cfg.lora, plan.device)
    model = load_model(spec, labels=labels or None, pad_token_id=tok.pad_token_id,
                       trust_remote_code=cfg.trust_remote_code, quantization_config=quant,
                       device_map={"": plan.device if plan.device != "cuda" else local_device_index()} if quant is not None else None)
    if quant is not None:
        model = prepare_quantized(model)
    fp32_attention = False
    if cpu_fp32_attention:
        from verifily_train.model.attention import for_plan

        fp32_attention = for_plan(model, plan.device, plan.precision)
    if cfg.lora.enabled:
        model = build_adapter(model, cfg.lora, spec)
    converted = 0
    if frozen_in_compute_dtype and cfg.lora.enabled and quant is None and plan.precision in ("bf16", "fp16"):
        from verifily_train.model.lora import store_frozen_linears_in

        converted = store_frozen_linears_in(model, torch.bfloat16 if plan.precision == "bf16" else torch.float16)
    compile_blocks = cfg.training.compile if compile_blocks is None else compile_blocks
    cheap_dropout = 0
    # compiled blocks fuse nn.Dropout's own sampling; the 16-bit sampler's in-place random_ breaks their graph
    if cpu_cheap_dropout and cfg.lora.enabled and plan.device == "cpu" and not compile_blocks:
        from verifily_train.model.lora import use_cheap_dropout

        cheap_dropout = use_cheap_dropout(model)
    fused = 0
    if fused_lora_output and cfg.lora.enabled:
        from verifily_train.model.lora import use_fused_lora_output

        fused = use_fused_lora_output(model)
    compiled = 0
    if compile_blocks:
        from verifily_train.training.compiled import compile_repeated_blocks

        compiled = compile_repeated_blocks(model)
    trainable, total = count_parameters(model)
    tok.padding_side = "right"  # training pads on the right; the loss masks padding anyway
    train_data = TokenizedSplit(tokenized_dir / tokenized["splits"]["train"]["file"], cfg.task)
    val_info = tokenized["splits"].get("val")
    val_data = TokenizedSplit(tokenized_dir / val_info["file"], cfg.task) if val_info else None
    seq2seq = spec.kind == KIND_SEQ2SEQ
    checkpoints = work_dir / "checkpoints"
    args = training_arguments(cfg, plan, checkpoints, val_data is not None, seq2seq)
    label_only = (label_only_head and spec.kind == KIND_CAUSAL and supports_label_only_head(model)
                  and not in_launched_rank())
    packed = False
    if pack_rows and label_only and plan.device in PACK_DEVICES and not compile_blocks:
        from verifily_train.model.attention import use_fp32_attention

        # the stage's attention function handles packed rows; in fp32 it is SDPA for anything else
        packed = fp32_attention or use_fp32_attention(unwrap_causal_lm(model))
    # grouping by length is exact in weight only where each token's share of the loss can be kept: CausalLMs
    # on the label-only path (constant denominator) and classification (one label per row)
    from verifily_train.training.batching import KeyedOrderSampler, LengthGroupedSampler, row_keys

    sampler, denominator = None, None
    keys = row_keys(train_data.columns["row_hash"])
    if cfg.training.group_by_length and (label_only or spec.kind == KIND_SEQ_CLS):
        sampler = LengthGroupedSampler([len(ids) for ids in train_data.columns["input_ids"]], cfg.training.batch_size,
                                       data_order_seed(cfg), keys)
        if label_only:
            denominator = label_tokens_per_step(train_data.columns["labels"], cfg)
    else:
        # rows ordered by a keyed hash: an arm without some rows sees the others in the same order (attribution);
        # under DDP accelerate deals its batches out to the ranks, so a step sees the one-process batch
        sampler = KeyedOrderSampler(keys, data_order_seed(cfg))
    trainer_cls = _trainer_class(Seq2SeqTrainer if seq2seq else Trainer, sampler, label_only, denominator, packed)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_data, eval_dataset=val_data,
                          data_collator=make_collator(spec, tok), processing_class=tok)
    trainer.add_callback(_checkpoint_marker_class())
    for callback in snapshot_callbacks(cfg.training.attribution_snapshots, out_dir, work_dir):  # attribute --rows
        trainer.add_callback(callback)
    if on_progress is not None:
        trainer.add_callback(_progress_hook_class()(on_progress))
    for callback in rank_callbacks():
        trainer.add_callback(callback)
    if cfg.runtime.progress:
        default_bar, step_bar = _progress_callback_class()
        trainer.remove_callback(default_bar)
        trainer.add_callback(step_bar)
    resume = last_complete_checkpoint(checkpoints)
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (RuntimeError, OSError) as err:
        from verifily_train.errors import DiskFullError, is_short_write

        if is_short_write(err):
            raise DiskFullError(checkpoints, None, "no space left on the device (or file size limit reached) "
                                                   "while writing a checkpoint: free space and re-run") from err
        raise
    seconds = time.perf_counter() - started

    adapter_dir = out_dir / ("adapter" if cfg.lora.enabled else "model")
    merged_dir: Optional[Path] = None
    if cfg.lora.enabled and not cfg.output.save_adapter_only:
        merged_dir = out_dir / "model"
    if is_main_rank():  # under DDP every rank holds the same weights: rank 0 writes them
        model.save_pretrained(adapter_dir)
        _normalize_adapter_config(adapter_dir / "adapter_config.json")
        tok.save_pretrained(adapter_dir)
        (adapter_dir / "labels.json").write_text(json.dumps({"labels": labels}, indent=2) + "\n", encoding="utf-8")
        if merged_dir is not None:
            # frozen weights held in bf16 for speed would merge into a bf16 model: merge into the fp32 base
            merged = _merge_into_fresh_base(spec, adapter_dir, labels, tok, cfg) if converted else model.merge_and_unload()
            merged.save_pretrained(merged_dir)
            tok.save_pretrained(merged_dir)
        _write_log(trainer.state.log_history, out_dir / "trainer_log.jsonl")

    tokens_per_epoch = sum(len(ids) for ids in train_data.columns["input_ids"])
    epochs_done = float(trainer.state.epoch or 0.0)
    train_tokens = int(round(tokens_per_epoch * epochs_done))
    train_loss = float(result.training_loss)
    return {
        "stage": "train",
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else None,
        "adapter_dir": adapter_dir.name,
        "merged_dir": merged_dir.name if merged_dir else None,
        "full_finetune": not cfg.lora.enabled,
        "log": "trainer_log.jsonl",
        "device": plan.device,
        "precision": plan.precision,
        "train_loss": train_loss if math.isfinite(train_loss) else None,
        "global_step": int(trainer.state.global_step),
        "epochs": epochs_done,
        "train_tokens": train_tokens,
        "train_seconds": seconds,
        "tokens_per_second": train_tokens / seconds if seconds > 0 else None,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "threads": torch.get_num_threads(),
        "num_processes": plan.num_processes,
        "label_only_head": label_only,
        "frozen_linears_in_compute_dtype": converted,
        "fp32_attention": fp32_attention,
        "cheap_dropout_layers": cheap_dropout,
        "fused_lora_output_layers": fused,
        "compiled_blocks": compiled,
        "packed_rows": packed,
        "padding_fraction": 0.0 if packed else _padding_fraction(train_data, sampler, cfg, label_only, plan.device,
                                                                 plan.precision),
    }


def _merge_into_fresh_base(spec: ModelSpec, adapter_dir: Path, labels, tok, cfg: TrainConfig):
    """The saved adapter merged into the base model loaded afresh (fp32), for ``output.save_adapter_only: false``."""
    from peft import PeftModel

    base = load_model(spec, labels=labels or None, pad_token_id=tok.pad_token_id,
                      trust_remote_code=cfg.trust_remote_code)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def _padding_fraction(train_data: TokenizedSplit, sampler, cfg: TrainConfig, split_by_length: bool,
                      device: str = "cpu", precision: str = "fp32") -> float:
    """Share of computed positions that are padding over the first epoch's batches (as the loss runs them)."""
    import torch

    from verifily_train.training.batching import LengthGroupedSampler, length_grouped_order
    from verifily_train.training.loss import group_cost_for, length_groups

    lengths = [len(ids) for ids in train_data.columns["input_ids"]]
    size = cfg.training.batch_size
    if isinstance(sampler, LengthGroupedSampler):
        order = length_grouped_order(lengths, size, sampler.seed, sampler.keys)
    elif sampler is not None:
        order = list(iter(sampler))
    else:
        generator = torch.Generator()
        generator.manual_seed(cfg.seed)
        order = torch.randperm(len(lengths), generator=generator).tolist()
    real = padded = 0
    for start in range(0, len(order), size):
        batch = [lengths[i] for i in order[start:start + size]]
        cost = group_cost_for(device, precision)
        split = split_by_length and cost is not None and len(batch) > 1
        groups = length_groups(batch, cost) if split else [list(range(len(batch)))]
        real += sum(batch)
        padded += sum(max(batch[i] for i in g) * len(g) for g in groups)
    return round(1.0 - real / padded, 4) if padded else 0.0
