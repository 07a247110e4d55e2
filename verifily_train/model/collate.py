"""Batches for training and evaluation: dynamic padding to each batch's longest row (never to max_seq_length)."""

from __future__ import annotations

from verifily_train.model.loading import KIND_SEQ_CLS, ModelSpec


def make_collator(spec: ModelSpec, tok):
    """Dynamic padding to the longest row of each batch; labels pad with -100."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding  # heavy: loaded when a batch is made

    if spec.kind == KIND_SEQ_CLS:
        return DataCollatorWithPadding(tok, padding=True)
    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
