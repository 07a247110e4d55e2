"""The scoring model: a Run's base model and adapter, set to one snapshot's trainable weights; per-row losses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from verifily_train.attribution.rows.plan import RowAttributionPlan
from verifily_train.config import load_config
from verifily_train.model.collate import make_collator
from verifily_train.model.loading import (KIND_CAUSAL, KIND_SEQ2SEQ, KIND_SEQ_CLS, ModelSpec, inspect_model, load_model,
                                          load_tokenizer)
from verifily_train.model.quantization import disable_cpu_4bit_repacking, quantization_config
from verifily_train.model.tokenize import TokenizedSplit
from verifily_train.training.loss import supports_label_only_head, unwrap_causal_lm

SCORE_BATCH = 16  # rows per gradient pass: per-row gradients are held for a batch at once


@dataclass
class ScoringModel:
    """The loaded model, its tokenizer and kind, and the trainable parameters in a fixed (sorted) order."""

    model: object
    tok: object
    kind: str
    names: List[str]
    params: list


def load_scoring_model(plan: RowAttributionPlan) -> ScoringModel:
    """Base model + the Run's final adapter (or fine-tuned model), in fp32 eval mode, gradients on the trainable set."""
    from dataclasses import replace

    import torch

    run = Path(plan.run_path)
    cfg = load_config(str(run / "config.yaml"))
    spec = inspect_model(plan.model_source, plan.task, cfg.trust_remote_code)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    tok.padding_side = "right"  # as in training; padding never reaches a kept position's loss
    labels = _labels(run)
    if not cfg.lora.enabled:
        model = load_model(replace(spec, source=str(run / "model")), labels=labels or None,
                           pad_token_id=tok.pad_token_id, trust_remote_code=cfg.trust_remote_code)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from peft import PeftModel

        quant = quantization_config(cfg.lora, "cpu")
        base = load_model(spec, labels=labels or None, pad_token_id=tok.pad_token_id,
                          trust_remote_code=cfg.trust_remote_code, quantization_config=quant,
                          device_map={"": "cpu"} if quant is not None else None)
        model = PeftModel.from_pretrained(base, run / "adapter", is_trainable=True)
        disable_cpu_4bit_repacking(model)  # else a no-grad pass repacks 4-bit layers and gradients stop (notes)
    model.eval()  # no dropout: a row's gradient is a function of the weights alone
    snapshot_names = _snapshot_names(plan)
    if snapshot_names is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(name in snapshot_names)
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    torch.set_grad_enabled(True)
    return ScoringModel(model, tok, spec.kind, [n for n, _ in named], [p for _, p in named])


def _labels(run: Path) -> List[str]:
    for folder in ("adapter", "model"):
        path = run / folder / "labels.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")).get("labels") or []
    return []


def _snapshot_names(plan: RowAttributionPlan) -> Optional[set]:
    """The parameter names the snapshots hold (the set that trained); None when only the final adapter is used."""
    from safetensors import safe_open

    files = [s["file"] for s in plan.snapshots if s.get("file")]
    if not files:
        return None
    with safe_open(files[0], framework="pt") as handle:
        return set(handle.keys())


def apply_snapshot(scoring: ScoringModel, snapshot: dict) -> None:
    """Set the trainable parameters to one snapshot's values (the final adapter's when it names no file)."""
    import torch
    from safetensors.torch import load_file

    if not snapshot.get("file"):
        return
    tensors = load_file(snapshot["file"])
    with torch.no_grad():
        for name, p in zip(scoring.names, scoring.params):
            p.copy_(tensors[name].to(p.dtype))


def row_losses(scoring: ScoringModel, batch: dict):
    """(per-row sum of token losses, per-row supervised token count, logits of classification or None)."""
    import torch
    import torch.nn.functional as F

    model, kind = scoring.model, scoring.kind
    if kind == KIND_SEQ_CLS:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="none")
        return loss, torch.ones_like(loss), logits
    labels = batch["labels"]
    if kind == KIND_CAUSAL and _head_is_frozen(model):
        return _label_position_losses(model, batch)
    if kind == KIND_CAUSAL:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = labels[:, 1:]  # position t predicts token t+1, as training.loss computes it
    elif kind == KIND_SEQ2SEQ:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                            reduction="none").view(labels.shape)
    mask = labels != -100
    return (token * mask).sum(dim=1), mask.sum(dim=1).float(), None


def _head_is_frozen(model) -> bool:
    """True when the output head can run on label positions only (``training.loss``'s families, head frozen)."""
    return supports_label_only_head(model) and not any(p.requires_grad for p in unwrap_causal_lm(model).lm_head.parameters())


def _label_position_losses(model, batch: dict):
    """Per-row causal losses with the head applied at supervised positions only, as training computes them.

    The head is most of a small model's forward at a large vocabulary (SmolLM2: 49k x 576) and all but the
    answer's positions are masked: the same losses and gradients without their logits.
    """
    import torch
    import torch.nn.functional as F

    base = unwrap_causal_lm(model)
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    token = F.cross_entropy(base.lm_head(hidden[keep]).float(), targets[keep], reduction="none")
    sums = torch.zeros(targets.shape[0], dtype=token.dtype).index_add(0, keep.nonzero()[:, 0], token)
    return sums, keep.sum(dim=1).float(), None


class SplitRows:
    """One tokenized split's rows (token ids, labels, identity) and a collator for batches of them."""

    def __init__(self, tokenized_dir: Path, split: str, task: str, scoring: ScoringModel):
        self.data = TokenizedSplit(Path(tokenized_dir) / f"{split}.parquet", task)
        self.collate = make_collator(ModelSpec("", scoring.kind, "", True), scoring.tok)

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, indices: Sequence[int], size: int = SCORE_BATCH):
        """(row indices, collated batch) over ``indices``, length-sorted so a batch pads little."""
        lengths = self.data.columns["input_ids"]
        order = sorted(indices, key=lambda i: (len(lengths[i]), i))
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            yield chunk, self.collate([self.data[i] for i in chunk])


def supervised_tokens(rows: SplitRows, kind: str) -> List[int]:
    """Per row, the number of token losses training sums for it (1 for classification)."""
    if kind == KIND_SEQ_CLS:
        return [1] * len(rows)
    skip = 1 if kind == KIND_CAUSAL else 0  # causal labels align with the ids: the first predicts nothing
    return [sum(1 for x in labels[skip:] if x != -100) for labels in rows.data.columns["labels"]]
