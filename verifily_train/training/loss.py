"""Causal-LM loss computed only where it is defined: the output head runs on label positions alone.

SFT masks the prompt (labels -100), and the output head of a small model is a large share of its work
(SmolLM2-135M: a 49k-token vocabulary against a hidden size of 576). The plain forward computes logits at
every position and throws most of them away; this one gathers the hidden states whose next-token label
is kept and applies the head to those only. Same value as the model's own loss (sum of token
cross-entropies over ``num_items_in_batch``, or their mean), same gradients.

It also splits each batch into sub-batches of similar length (``length_groups``), so a random batch of
a skewed dataset stops computing its padding (a third of the positions on the bench data) while the
batch itself, and so the optimisation, stays exactly what the random sampler drew.
"""

from __future__ import annotations

from typing import List, Optional

# families whose CausalLM forward is exactly ``logits = lm_head(decoder(...).last_hidden_state)``:
# no logit soft-capping (gemma2/3), logit scaling (cohere, granite) or extra heads
# the fixed per-call cost of one more sub-batch, in padded tokens of work: an estimate (a forward and
# backward's per-op overhead against SmolLM2's per-token cost on 2 CPU cores), not tuned; below it,
# splitting a batch stops paying
GROUP_COST_TOKENS = 24

LABEL_ONLY_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"})


def unwrap_causal_lm(model):
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base


def supports_label_only_head(model) -> bool:
    """True when :func:`label_position_loss` is exact for this model."""
    base = unwrap_causal_lm(model)
    config = getattr(base, "config", None)
    return (getattr(config, "model_type", None) in LABEL_ONLY_FAMILIES
            and getattr(config, "final_logit_softcapping", None) is None
            and hasattr(base, "model") and hasattr(base, "lm_head")
            and not getattr(config, "is_encoder_decoder", False))


def length_groups(lengths: List[int], group_cost: Optional[int] = None) -> List[List[int]]:
    """Rows of one batch split into runs of the length-sorted order, minimising padded tokens + a cost per run.

    Exact dynamic programme over at most a batch of rows: each run is padded only to its own longest row.
    """
    group_cost = GROUP_COST_TOKENS if group_cost is None else group_cost
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + lengths[order[j - 1]] * (j - i) + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _label_loss_sum(base, input_ids, attention_mask, labels):
    """(sum of next-token cross-entropies, number of targets) with the head applied at target positions only."""
    import torch.nn.functional as F

    hidden = base.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = base.lm_head(hidden[:, :-1][keep]).float()  # (kept positions, vocab): fp32 like ForCausalLMLoss
    return F.cross_entropy(logits, targets[keep], reduction="sum"), keep.sum()


def label_position_loss(model, inputs: dict, num_items_in_batch=None, split_by_length: bool = True):
    """Next-token cross-entropy over positions whose label is not -100, with the head applied only there.

    ``split_by_length``: the (right-padded) batch runs as a few sub-batches of similar length, each cut
    to its own longest row, in one autograd graph: the same batch, the same loss and gradient (padding
    never changed a real position's value), without computing most of the padding.
    """
    import torch

    base = unwrap_causal_lm(model)
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
    right_padded = mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all())
    if split_by_length and right_padded and ids.shape[0] > 1:
        lengths = mask.sum(dim=1).tolist()
        total, count = 0.0, 0
        for group in length_groups(lengths):
            width = max(int(lengths[i]) for i in group)
            index = torch.tensor(group, device=ids.device)
            part_sum, part_count = _label_loss_sum(base, ids[index, :width], mask[index, :width], labels[index, :width])
            total, count = total + part_sum, count + part_count
    else:
        total, count = _label_loss_sum(base, ids, mask, labels)
    if num_items_in_batch is None:
        return total / count.clamp(min=1) if hasattr(count, "clamp") else total / max(count, 1)
    if hasattr(num_items_in_batch, "to"):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
