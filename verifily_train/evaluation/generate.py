"""Batched greedy generation for SFT evaluation: left padding, length-sorted batches, KV cache."""

from __future__ import annotations

from typing import List, Optional

from verifily_train.model.loading import KIND_CAUSAL, ModelSpec
from verifily_train.quiet import progress_bars


def generate_texts(model, spec: ModelSpec, tok, prompts: List[List[int]], batch_size: int, max_new_tokens: int,
                   device: str, precision: str, progress: bool, stop_ids: Optional[List[int]] = None) -> List[str]:
    """Greedy continuations of ``prompts`` in input order; only scalar text per example is kept.

    ``stop_ids``: the tokens that end a reply (the chat template's end-of-turn token as well as EOS)."""
    import torch
    from tqdm.auto import tqdm

    causal = spec.kind == KIND_CAUSAL
    pad = tok.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: List[str] = [""] * len(prompts)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.no_grad():
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress_bars(progress), leave=False):
            width = max(len(prompts[i]) for i in batch) or 1
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                p = prompts[i]
                if causal:  # pad left: generation continues from the last position
                    ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                    mask[row, width - len(p):] = 1
                else:
                    ids[row, :len(p)] = torch.tensor(p, dtype=torch.long)
                    mask[row, :len(p)] = 1
            with torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                           use_cache=True, pad_token_id=pad, eos_token_id=stop_ids or tok.eos_token_id)
            new_tokens = generated[:, width:] if causal else generated
            texts = tok.batch_decode(new_tokens.cpu(), skip_special_tokens=True)
            for row, i in enumerate(batch):
                outputs[i] = texts[row].strip()
    return outputs
