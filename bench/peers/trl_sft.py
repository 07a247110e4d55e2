"""TRL's SFTTrainer on a prompt-completion dataset, as the TRL docs show it, with the other contenders' settings.

Two TRL defaults differ from every other contender and are set to match them: ``gradient_checkpointing``
(TRL: on; it trades ~30% more compute for memory) and ``bf16`` (TRL: on). Everything else is TRL's
default: completion-only loss, no packing, dynamic padding, its per-step entropy/accuracy metrics.
"""

from __future__ import annotations

import tempfile
import time
from typing import List

from bench.common import StepClock
from bench.peers.hf_peft import prompt_of


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def train_trl_sft(model_dir: str, rows: List[dict], settings, bf16: bool = False, torch_compile: bool = False) -> dict:
    """Train LoRA with ``trl.SFTTrainer``; returns the trained model, real tokens, seconds and the Trainer's loss.

    ``torch_compile``: the Trainer's own ``torch_compile=True`` (the whole model through ``torch.compile``),
    what a TRL user who wants speed on a GPU turns on.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list([{"prompt": prompt_of(r), "completion": r["output"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=settings.batch_size,
                         num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
                         lr_scheduler_type="cosine", warmup_steps=settings.warmup_ratio,
                         weight_decay=settings.weight_decay, logging_steps=10, save_strategy="no", report_to=[],
                         use_cpu=not torch.cuda.is_available(), seed=settings.seed, data_seed=settings.seed,
                         bf16=bf16, gradient_checkpointing=False, max_length=settings.max_len, packing=False,
                         disable_tqdm=True, dataset_num_proc=None, torch_compile=torch_compile)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)
        clock = StepClock()
        trainer.add_callback(clock.callback())
        real_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * settings.epochs
        started, cpu_started = time.perf_counter(), time.process_time()
        result = trainer.train()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"model": trainer.model, "real_tokens": real_tokens, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "train_loss": float(result.training_loss), "steps": int(trainer.state.global_step),
            "steady_tokens_per_second": clock.steady_tokens_per_second(real_tokens)}
