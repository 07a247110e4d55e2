"""Our contender: the real train stage (``verifily_train.training.trainer.train_adapter``) on prepared data."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional

from bench.common import LLAMA_LINEAR, StepClock, TrainSettings


class OurTrainStage:
    """Tokenize once (the tokenize stage, untimed), then run the train stage as ``verifily train`` does."""

    def __init__(self, model_dir: Path, train_path: Path, heldout_path: Path, settings: TrainSettings, work: Path,
                 full_finetune: bool = False, extra: Optional[List[str]] = None):
        from verifily_train.config import load_config
        from verifily_train.pipeline.fingerprint import fingerprint_stage
        from verifily_train.pipeline.runner import run_uncached

        self.settings, self.work = settings, Path(work)
        overrides = [
            "task=sft", f"base_model={model_dir}", f"data_paths.train={train_path}", f"data_paths.test={heldout_path}",
            f"seed={settings.seed}", f"training.num_epochs={settings.epochs}",
            f"training.batch_size={settings.batch_size}", "training.gradient_accumulation_steps=1",
            f"training.learning_rate={settings.learning_rate}", "training.lr_scheduler=cosine",
            f"training.warmup_ratio={settings.warmup_ratio}", f"training.weight_decay={settings.weight_decay}",
            f"training.max_seq_length={settings.max_len}", "training.save_steps=100000", "training.logging_steps=10",
            f"lora.enabled={str(not full_finetune).lower()}", f"lora.r={settings.lora_r}",
            f"lora.alpha={settings.lora_alpha}", f"lora.dropout={settings.lora_dropout}",
            "lora.target_modules=[" + ",".join(LLAMA_LINEAR) + "]", "runtime.progress=false",
            # the peers' prompt template (prompt.template's default is theirs): with format auto, a model with
            # a chat template (SmolLM2-Instruct) would get the chat rendering and its default system prompt,
            # 46 tokens a short row instead of the peers' 29: other work, and tokens/s ratios no time ratios
            "prompt.format=template",
        ] + list(extra or [])
        self.cfg = load_config(None, overrides)
        self.fp = fingerprint_stage(self.cfg, self.work / "cache")
        tok_dir = self.work / "tokenized"
        self.tokenized = run_uncached("tokenize", self.cfg, self.fp, tok_dir, self.work)
        self.tokenized_dir = tok_dir

    def heldout_examples(self) -> List[dict]:
        from verifily_train.model.tokenize import TokenizedSplit

        data = TokenizedSplit(self.tokenized_dir / self.tokenized["splits"]["test"]["file"], "sft")
        return [data[i] for i in range(len(data))]

    def train(self, precision: str = "fp32", group_by_length: bool = False, keep_model: bool = True,
              device: str = "cpu", hf_order: bool = False, **levers) -> dict:
        """One run of the train stage into a fresh folder; returns its manifest plus the trained model.

        ``levers``: ``speed.Levers`` fields to override (``label_only_head=False``, ``pack_rows=False``, ...).
        ``hf_order``: the rows in the HF Trainer's own random order (its ``RandomSampler`` at the run's seed, the
        peers' order) instead of the stage's keyed order: a diagnostic arm that separates what the levers do to
        the loss from what a different draw of the row order does.
        """
        with _hf_sampler_order() if hf_order else contextlib.nullcontext():
            return self._train(precision, group_by_length, keep_model, device, **levers)

    def _train(self, precision: str, group_by_length: bool, keep_model: bool, device: str, **levers) -> dict:
        import dataclasses

        from verifily_train.model.device import DevicePlan
        from verifily_train.model.loading import load_tokenizer
        from verifily_train.training.speed import Levers
        from verifily_train.training.trainer import train_adapter

        cfg = dataclasses.replace(self.cfg, training=dataclasses.replace(self.cfg.training,
                                                                         group_by_length=group_by_length))
        spec = self.fp.model_spec
        tok = load_tokenizer(spec)
        out = Path(tempfile.mkdtemp(dir=self.work, prefix="train-"))
        clock = StepClock()
        try:
            manifest = train_adapter(cfg, spec, tok, self.tokenized, self.tokenized_dir,
                                     DevicePlan(device=device, precision=precision), out / "out", out / "work",
                                     fast=Levers(**{"compile_blocks": False, **levers}), on_progress=clock)
            manifest["steady_tokens_per_second"] = clock.steady_tokens_per_second(manifest["train_tokens"])
            if keep_model:
                manifest["model"] = self._load_trained(spec, out / "out" / manifest["adapter_dir"], cfg.lora.enabled,
                                                       device)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return manifest

    @staticmethod
    def _load_trained(spec, folder: Path, lora: bool, device: str = "cpu"):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if not lora:
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        base = AutoModelForCausalLM.from_pretrained(spec.source, dtype=torch.float32)
        return PeftModel.from_pretrained(base, folder).to(device)


@contextlib.contextmanager
def _hf_sampler_order():
    """While it runs, the train stage leaves the row order to the HF Trainer (no sampler of its own)."""
    from verifily_train.training import trainer

    saved = trainer.training_order
    trainer.training_order = lambda *args, **kwargs: (None, None)
    try:
        yield
    finally:
        trainer.training_order = saved
