"""A bare HF Trainer + PEFT LoRA script, written the way the PEFT causal-LM examples write it.

``padding="max_length"`` is the examples' own preprocessing (every row padded to ``max_length``, then
``default_data_collator``); ``padding="longest"`` is the common improvement (dynamic padding with
``DataCollatorForSeq2Seq``). The examples pad on the left; we pad on the right so that positions match
an unpadded row (the same loss as every other contender, and no slower).
"""

from __future__ import annotations

import tempfile
import time
from typing import List

from bench.common import StepClock

PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def prompt_of(row: dict) -> str:
    return (PROMPT if str(row.get("input") or "").strip() else PROMPT_NO_INPUT).format(
        instruction=row["instruction"], input=row.get("input") or "")


def train_hf_peft(model_dir: str, rows: List[dict], settings, padding: str = "longest", bf16: bool = False) -> dict:
    """Train LoRA on ``rows``; returns the trained model, real tokens, seconds and the Trainer's loss."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, default_data_collator, set_seed)

    set_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_length = settings.max_len

    def preprocess_function(examples):
        inputs = [prompt_of({"instruction": i, "input": x}) for i, x in zip(examples["instruction"], examples["input"])]
        model_inputs = tokenizer(inputs)
        labels = tokenizer(examples["output"], add_special_tokens=False)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for sample_input_ids, label_ids in zip(model_inputs["input_ids"], labels["input_ids"]):
            label_ids = label_ids + [tokenizer.eos_token_id]
            ids = (sample_input_ids + label_ids)[:max_length]
            lab = ([-100] * len(sample_input_ids) + label_ids)[:max_length]
            mask = [1] * len(ids)
            if padding == "max_length":
                pad = max_length - len(ids)
                ids, lab, mask = ids + [tokenizer.pad_token_id] * pad, lab + [-100] * pad, mask + [0] * pad
            out["input_ids"].append(ids)
            out["attention_mask"].append(mask)
            out["labels"].append(lab)
        return out

    dataset = Dataset.from_list([{k: r[k] for k in ("instruction", "input", "output")} for r in rows])
    train_dataset = dataset.map(preprocess_function, batched=True, remove_columns=dataset.column_names)
    real_tokens = sum(sum(m) for m in train_dataset["attention_mask"]) * settings.epochs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings.lora_r, lora_alpha=settings.lora_alpha,
                             lora_dropout=settings.lora_dropout, target_modules="all-linear")
    model = get_peft_model(model, peft_config)
    collator = default_data_collator if padding == "max_length" else DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=-100)
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=settings.batch_size,
                                 num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
                                 lr_scheduler_type="cosine", warmup_steps=settings.warmup_ratio,
                                 weight_decay=settings.weight_decay, logging_steps=10, save_strategy="no",
                                 report_to=[], use_cpu=not torch.cuda.is_available(), seed=settings.seed,
                                 data_seed=settings.seed, bf16=bf16, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator)
        clock = StepClock()
        trainer.add_callback(clock.callback())
        started, cpu_started = time.perf_counter(), time.process_time()
        result = trainer.train()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"model": model, "real_tokens": real_tokens, "seconds": seconds, "cpu_seconds": cpu_seconds, "train_loss": float(result.training_loss),
            "steady_tokens_per_second": clock.steady_tokens_per_second(real_tokens),
            "steps": int(trainer.state.global_step)}
