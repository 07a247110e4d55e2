"""Causal-LM loss computed only where it is defined: the output head runs on label positions alone.

SFT masks the prompt (labels -100), and the output head of a small model is a large share of its work (a
vocabulary tens of times its hidden size). The plain forward computes logits at every position and throws
most of them away; this one gathers the hidden states whose next-token label is kept and applies the head
to those only. Same value as the model's own loss (sum of token
cross-entropies over ``num_items_in_batch``, or their mean), same gradients.

It also splits each batch into sub-batches of similar length (``length_groups``), so a random batch of a
skewed dataset stops computing its padding (a large share of its positions) while the batch itself, and so
the optimisation, stays exactly what the random sampler drew.

The family test (which families' head may run on label positions alone) is model/registry.py's; when each
path runs is the speed plan's (training/speed/).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import List, Optional

from verifily_train.model import last_layer, lora
from verifily_train.model.attention import NAME, PACKED_KWARG, PackedRows
from verifily_train.model.registry import family_of

# the fixed per-call cost of one more sub-batch, in padded tokens of work, by device type; None: never split.
# CPU: a forward and backward's per-op overhead against a small model's per-token cost (an estimate, not
# tuned). GPUs: a training step there is bound by kernel launches, not by arithmetic, so every sub-batch adds
# launches for padding that was nearly free. CPU under bf16 autocast: every extra sub-batch also re-casts its
# activations for each adapted layer, and the matmuls it saves are the cheap part. Both measured slower split
# than whole (docs/models.md, "Speed levers"). Keys: "<device>-<precision>" first, then "<device>".
GROUP_COST_TOKENS = {"cpu": 24, "cpu-bf16": None, "cuda": None, "mps": None}
DEFAULT_GROUP_COST = 24
# devices where a batch runs packed (its real tokens as one sequence, attention re-padded by row) when the
# model takes the stage's attention function. Not on GPUs: unmeasured there, and a GPU step is bound by
# kernel launches, which packing adds (index copies per layer) rather than removes.
PACK_DEVICES = frozenset({"cpu"})
# under CPU bf16 autocast a small model's packed batch is padded to a multiple of PACK_BUCKET_TOKENS, so that row
# counts repeat (``RowCounts``). oneDNN builds its bf16 matmul kernels for each new row count (some 30 product
# shapes a step: bench/micro_row_counts.py), and packed rows give nearly every step a new count. That cost is
# about the same for any model, while a padded token costs what a real one does: the bucket won on the small
# bench model and lost on SmolLM2, and so did padding only up to a count already run. So only models up to
# PACK_BUCKET_MAX_BODY_PARAMETERS (between the two measured sizes, not tuned) pad. fp32 matmuls (MKL) build
# nothing per shape: no padding (docs/models.md, "Speed levers").
PACK_BUCKET_TOKENS = 64
PACK_BUCKET_MAX_BODY_PARAMETERS = 40_000_000


def group_cost_for(device_type: str, precision: str = "fp32") -> Optional[int]:
    """Padded tokens one more sub-batch must save to be worth its fixed cost; None: never split."""
    key = f"{device_type}-{precision}"
    return GROUP_COST_TOKENS[key] if key in GROUP_COST_TOKENS else GROUP_COST_TOKENS.get(device_type, DEFAULT_GROUP_COST)


def autocast_precision(device_type: str) -> str:
    """"bf16" or "fp16" inside an autocast region on ``device_type``, else "fp32"."""
    import torch

    if not torch.is_autocast_enabled(device_type):
        return "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(torch.get_autocast_dtype(device_type), "fp32")


def unwrap_causal_lm(model):
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base


def supports_label_only_head(model) -> bool:
    """True when :func:`label_position_loss` is exact for this model."""
    base = unwrap_causal_lm(model)
    config = getattr(base, "config", None)
    return (family_of(base).label_only_head
            and getattr(config, "final_logit_softcapping", None) is None
            and hasattr(base, "model") and hasattr(base, "lm_head")
            and not getattr(config, "is_encoder_decoder", False))


def length_groups(lengths: List[int], group_cost: Optional[int] = None) -> List[List[int]]:
    """Rows of one batch split into runs of the length-sorted order, minimising padded tokens + a cost per run.

    Exact dynamic programme over at most a batch of rows: each run is padded only to its own longest row.
    """
    group_cost = DEFAULT_GROUP_COST if group_cost is None else group_cost
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


# lm_head -> ((weight identity, version, dtype), the weight cast to the autocast dtype)
_HEAD_CASTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _autocast_head_weight(head):
    """A frozen fp32 head weight cast to the autocast dtype once, reused while the weight is unchanged; else None.

    Autocast re-casts a weight that does not require grad at every call: a head tied to the input
    embeddings (a vocabulary-sized matrix) stays fp32 (see ``lora.store_frozen_linears_in``) and would be cast
    once per sub-batch per step. The cached cast is the same round-to-nearest copy autocast makes, so the
    logits are unchanged; it is re-made if the weight changes (its version counter moves).
    """
    import torch

    weight = getattr(head, "weight", None)
    device = weight.device.type if weight is not None else "cpu"
    if weight is None or weight.requires_grad or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    if weight.dtype == dtype or weight.dtype != torch.float32:
        return None
    key = (weight.data_ptr(), weight._version, dtype)
    cached = _HEAD_CASTS.get(head)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        _HEAD_CASTS[head] = cached
    return cached[1]


def _label_loss_sum(base, input_ids, attention_mask, labels):
    """(sum of next-token cross-entropies, number of targets) with the head applied at target positions only."""
    hidden = base.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return _head_loss_sum(base, hidden[:, :-1], labels[:, 1:])


def _head_loss_sum(base, hidden, targets):
    """(sum of cross-entropies, count) of ``hidden`` positions whose target is kept, the head applied there only."""
    import torch
    import torch.nn.functional as F

    keep = targets != -100
    kept = hidden[keep]
    head = base.lm_head
    weight = _autocast_head_weight(head) if isinstance(head, torch.nn.Linear) else None
    logits = F.linear(kept, weight, head.bias) if weight is not None else head(kept)
    # (kept positions, vocab) in fp32, like ForCausalLMLoss
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()


def _right_padded(mask) -> bool:
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def can_pack(base, ids, mask) -> bool:
    """True when :func:`_packed_label_loss_sum` is exact and available for this right-padded batch.

    It needs the stage's CPU attention function (``training.attention``, which handles packed rows), rows
    that each hold a token, and no sliding window shorter than the batch (its mask would need the window).
    """
    config = base.config
    if ids.device.type not in PACK_DEVICES or getattr(config, "_attn_implementation", None) != NAME:
        return False
    if mask is None or ids.shape[0] < 2 or not _right_padded(mask) or not bool(mask[:, 0].all()):
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or int(window) >= ids.shape[1]


class RowCounts:
    """Which row counts one training's packed batches run at: the next multiple of ``bucket`` tokens."""

    def __init__(self, bucket: int = PACK_BUCKET_TOKENS):
        self.bucket = bucket

    @classmethod
    def for_model(cls, model) -> Optional["RowCounts"]:
        """A bucket for a model up to PACK_BUCKET_MAX_BODY_PARAMETERS outside its embeddings; None (no padding) above."""
        embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                      for p in m.parameters()}
        body = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
        return cls() if body <= PACK_BUCKET_MAX_BODY_PARAMETERS else None

    def describe(self) -> str:
        return f"multiple of {self.bucket}"

    def __call__(self, real: int) -> int:
        return -(-real // self.bucket) * self.bucket


def pad_rows(ids, mask, labels, total: int):
    """The batch with rows of unlabelled padding tokens appended, so that its real tokens number ``total``.

    Each padding row is at most as long as the batch's longest row (attention's re-padded width stays) and is
    a row of its own to attention, so no real token sees it; its labels are -100, so nothing reads its output
    and its gradient is zero. Returns (ids, mask, labels, real tokens before the padding).
    """
    import torch

    lengths = mask.sum(dim=1)
    real = int(lengths.sum())
    need, width = max(total - real, 0), max(int(lengths.max()), 1)
    if need == 0:
        return ids, mask, labels, real
    sizes = [width] * (need // width) + ([need % width] if need % width else [])
    pad_mask = (torch.arange(ids.shape[1], device=ids.device)[None, :]
                < torch.tensor(sizes, device=ids.device)[:, None]).to(mask.dtype)
    pad_ids = ids.new_zeros((len(sizes), ids.shape[1]))
    pad_labels = labels.new_full((len(sizes), labels.shape[1]), -100)
    return torch.cat([ids, pad_ids]), torch.cat([mask, pad_mask]), torch.cat([labels, pad_labels]), real


def dead_tails(mask, labels):
    """Each right-padded row's mask cut after its last target-reading position (None: nothing to cut).

    Position j of a row is read by the loss only if some position k >= j of that row predicts a kept label
    (k's query attends to j's key in every layer). Past the row's last labelled position nothing does: in
    SFT that is the final token (the end-of-turn token is a label, predicted from the position before it,
    and predicts nothing itself), one token a row. A row with no label keeps one
    token. Returns (cut mask, the kept positions' indices among the uncut packed tokens) or None.
    """
    import torch

    width = mask.shape[1]
    slots = torch.arange(width, device=mask.device)
    labelled = (labels[:, :width] != -100) & mask.bool()
    live = torch.minimum(mask.sum(dim=1), (labelled * slots).amax(dim=1).clamp(min=1))
    cut = (slots[None, :] < live[:, None]).to(mask.dtype)
    if bool((cut == mask).all()):
        return None
    return cut, cut[mask.bool()].nonzero()[:, 0]


def _packed_label_loss_sum(base, ids, mask, labels, pad_to=None, trim: bool = False):
    """:func:`_label_loss_sum` with the batch's real tokens packed into one sequence (no padding computed).

    Every per-token layer (projections, MLP, norms, LoRA, dropout) runs on the concatenated real tokens
    of the right-padded batch, with each row's own position ids; attention re-pads them by row
    (``attention.PackedRows``), so no token attends to another row's. The same loss and gradients as
    the padded forward, without computing any padding outside attention.

    ``pad_to`` (CPU bf16 autocast: a :class:`RowCounts`): maps the batch's real token count to the packed length
    to run, padded with rows of their own (:func:`pad_rows`); LoRA's dropout draws bits for the real tokens
    only (``lora.real_rows``), so the masks, the loss and the random stream are the unpadded ones'.

    ``trim``: each row's dead tail (:func:`dead_tails`) is not computed at all; LoRA's dropout still draws its
    bits and drops them (``last_layer.rows_of``), so the masks and the stream are the uncut ones'.
    """
    import torch

    select_last = last_layer.selects_label_rows(base)
    real_tokens = None
    kept = contextlib.nullcontext()
    cut = dead_tails(mask, labels) if trim else None
    if cut is not None:
        kept = last_layer.rows_of(int(mask.sum()), cut[1])
        mask = cut[0]
    if pad_to is not None and not select_last:  # the label-rows last layer (fp32 only) counts every packed row
        ids, mask, labels, real_tokens = pad_rows(ids, mask, labels, pad_to(int(mask.sum())))
    rows = ids.shape[0]
    lengths = mask.sum(dim=1)
    width = int(lengths.max())
    real = mask[:, :width].bool()
    slots = torch.arange(width, device=ids.device)
    offsets = torch.cumsum(lengths, 0) - lengths
    in_row = slots[None, :] < lengths[:, None]
    gather = torch.where(in_row, offsets[:, None] + slots[None, :], offsets[:, None]).reshape(-1)
    scatter = (torch.arange(rows, device=ids.device)[:, None] * width + slots[None, :])[in_row]
    causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
    attend = causal[None, None] & in_row[:, None, None, :]  # (rows, 1, width, width)
    # each position's next-token label, read before the cut to ``width`` (a cut row's last kept position
    # predicts a label past its new end)
    targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), -100)], dim=1)[:, :width][real]
    ids = ids[:, :width]
    position_ids = (torch.cumsum(mask[:, :width], dim=1) - 1)[real][None]
    # the last decoder layer may compute the label positions alone (model/last_layer.py): it returns those rows
    select = (targets != -100).nonzero()[:, 0] if select_last else None
    if select is not None and select.numel() == 0:  # no label in the batch: the whole layer (its loss is 0)
        select = None
    # a 4D mask is used as given (transformers builds none); only the packed attention reads it
    with kept, lora.real_rows(real_tokens):
        hidden = base.model(input_ids=ids[real][None], position_ids=position_ids, attention_mask=attend,
                            use_cache=False,
                            **{PACKED_KWARG: PackedRows(gather, scatter, rows, width, select)}).last_hidden_state
    return _head_loss_sum(base, hidden[0], targets if select is None else targets.index_select(0, select))


def label_position_loss(model, inputs: dict, num_items_in_batch=None, split_by_length: bool = True,
                        pack: bool = True, pad_to=None, trim: bool = False):
    """Next-token cross-entropy over positions whose label is not -100, with the head applied only there.

    ``pack`` (CPU, the stage's attention function): the batch's real tokens run packed into one sequence,
    attention kept within each row (:func:`_packed_label_loss_sum`). Otherwise ``split_by_length``: the
    (right-padded) batch runs as a few sub-batches of similar length, each cut to its own longest row, in
    one autograd graph. Either way the same batch, the same loss and gradient (padding never changed a
    real position's value), without computing most of the padding. ``pad_to``: a packed batch's length
    padded to a multiple of a bucket (:class:`RowCounts`, CPU bf16, small models). ``trim``: packed rows
    leave out each row's dead tail, the positions no label is read from (:func:`dead_tails`).
    """
    import torch

    base = unwrap_causal_lm(model)
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
    cost = group_cost_for(ids.device.type, autocast_precision(ids.device.type))
    split = split_by_length and cost is not None and mask is not None and ids.shape[0] > 1
    if pack and can_pack(base, ids, mask):
        total, count = _packed_label_loss_sum(base, ids, mask, labels, pad_to, trim)
    elif split and _right_padded(mask):
        lengths = mask.sum(dim=1).tolist()
        total, count = 0.0, 0
        for group in length_groups(lengths, cost):
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
