"""Attention in fp32 under CPU bf16 autocast: PyTorch's bf16 CPU attention kernel is the slow part there.

Under CPU bf16 autocast the matrix products run faster than in fp32, but ``scaled_dot_product_attention``'s
CPU flash kernel runs several times slower in bf16 than in fp32 and eats the gain (docs/models.md, "Speed
levers", has the profile). This attention function casts the (small) query, key and value to fp32 and
computes attention there, then casts the output back, so the projections and MLP keep bf16's speed and
attention keeps fp32's (and fp32's precision).

For short sequences it computes attention as plain fp32 matrix products and a softmax rather than with
SDPA's CPU flash kernel: with a padding mask (every whole bf16 batch has one) that kernel's backward is a
large share of a LoRA step, and the plain products make the step faster at equal loss. They keep one
``batch x heads x query x key`` fp32 tensor per layer for the backward, so above ``EAGER_MAX_SCORES`` elements (and with attention dropout, position
biases or anything else the plain form does not cover) SDPA runs instead.
It is registered with transformers' ``AttentionInterface`` on the CPU: under bf16/fp16 for the above, and
in fp32 too when the train stage packs rows (``PackedRows``: each batch's real tokens as one sequence,
attention re-padded by row), where it is plain SDPA for anything but packed rows.
"""

from __future__ import annotations

NAME = "verifily_sdpa_fp32_cpu"
PACKED_KWARG = "verifily_packed_rows"  # the keyword a packed forward hands each attention call (PackedRows)
_registered = False


EAGER_MAX_SCORES = 8 * 2 ** 20  # attention scores per layer (32 MiB in fp32) up to which the plain form runs
# what the plain form honours, or SDPA ignores too (the mask carries a sliding window)
_EAGER_KWARGS = {"dropout", "scaling", "is_causal", "position_ids", "cache_position", "use_cache", "sliding_window",
                 "output_attentions"}


def _eager_fp32(module, query, key, value, attention_mask, scaling=None, is_causal=None, **_):
    """softmax(q k^T * scale + mask) v in fp32, with grouped key/value heads and SDPA's mask conventions
    (boolean: True attends; floating: added; none: causal when the module is)."""
    import torch

    q, k, v = query.float(), key.float(), value.float()
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        b, heads, t, d = k.shape
        k = k[:, :, None].expand(b, heads, groups, t, d).reshape(b, heads * groups, t, d)
        v = v[:, :, None].expand(b, heads, groups, t, d).reshape(b, heads * groups, t, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and q.shape[2] > 1:
        attention_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask.float()
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).contiguous()


def _plain_form_applies(query, key, kwargs) -> bool:
    if kwargs.get("dropout") or any(v is not None for k, v in kwargs.items() if k not in _EAGER_KWARGS):
        return False
    return query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2] <= EAGER_MAX_SCORES


class PackedRows:
    """Where the rows of a right-padded batch sit once packed into one ``(1, tokens)`` sequence.

    The train stage's packed path (``training.loss``) runs every per-token layer on the batch's real
    tokens only, concatenated; attention alone needs the rows apart. ``gather`` (rows x width) picks,
    for each slot of the re-padded ``(rows, width)`` layout, its token in the packed sequence (a padding
    slot repeats its row's first token, which the mask hides); ``scatter`` picks each packed token's slot
    back out of that layout. The 4D boolean mask handed to attention with it is causal within each row
    and hides the padding slots as keys, so no token attends across rows.
    """

    __slots__ = ("gather", "scatter", "rows", "width", "select")

    def __init__(self, gather, scatter, rows: int, width: int, select=None):
        self.gather, self.scatter, self.rows, self.width = gather, scatter, rows, width
        # packed positions whose last-layer output is read (model/last_layer.py); None: every position
        self.select = select


def _repad(states, gather, rows: int, width: int):
    """(1, heads, tokens, dim) -> (rows, heads, width, dim): slot j of row r holds token ``gather[r * width + j]``."""
    heads, dim = states.shape[1], states.shape[3]
    picked = states[0].transpose(0, 1).index_select(0, gather)
    return picked.view(rows, width, heads, dim).transpose(1, 2)


def _attend_packed(module, query, key, value, attention_mask, packed: PackedRows, **kwargs):
    """Attention over packed rows: re-pad query, key and value to (rows, heads, width, dim), attend, unpad."""

    def repad(states):
        return _repad(states, packed.gather, packed.rows, packed.width)

    out, _ = _attend_rows(module, repad(query), repad(key), repad(value), attention_mask, **kwargs)
    # (rows, width, heads, dim) -> (1, tokens, heads, dim), the layout attention functions return
    return out.reshape(packed.rows * packed.width, *out.shape[2:]).index_select(0, packed.scatter)[None], None


def attend_packed_queries(module, query, key, value, packed: PackedRows, select, **kwargs):
    """Attention of the packed positions ``select`` alone (sorted), over every packed row's keys and values.

    ``query``: (1, heads, selected, dim), the selected positions in packed order; ``key``/``value``:
    (1, kv heads, tokens, dim). The selected queries are re-padded by row to (rows, heads, width_q, dim)
    and the keys and values to (rows, kv heads, width, dim), as :func:`_attend_packed` does; a query at
    slot s of its row attends that row's slots up to s, the keys the whole layer gives it. Returns
    (1, selected, heads, dim).
    """
    import torch

    width, rows = packed.width, packed.rows
    slot = packed.scatter.index_select(0, select)  # (selected,) slot in the (rows x width) layout
    row, position = torch.div(slot, width, rounding_mode="floor"), slot % width
    counts = torch.bincount(row, minlength=rows)
    width_q = max(int(counts.max()), 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(select.shape[0], device=select.device) - starts.index_select(0, row)
    slots_q = torch.arange(width_q, device=select.device)
    in_row = slots_q[None, :] < counts[:, None]
    last = max(select.shape[0] - 1, 0)
    gather_q = torch.where(in_row, starts[:, None] + slots_q[None, :], 0).clamp(max=last).reshape(-1)
    scatter_q = row * width_q + rank
    # each query slot's position in its row; a padding slot takes position 0 (it attends slot 0, and is dropped)
    query_pos = torch.where(in_row, position.index_select(0, gather_q).view(rows, width_q), 0)
    keys = torch.arange(width, device=select.device)
    attend = (keys[None, None, :] <= query_pos[:, :, None])[:, None]  # (rows, 1, width_q, width)
    q = _repad(query, gather_q, rows, width_q)
    k = _repad(key, packed.gather, rows, width)
    v = _repad(value, packed.gather, rows, width)
    out, _ = _attend_rows(module, q, k, v, attend, **kwargs)  # (rows, width_q, heads, dim)
    return out.reshape(rows * width_q, *out.shape[2:]).index_select(0, scatter_q)[None]


def _low_precision(query, key, value):
    """bf16/fp16 if any input is in it or CPU autocast is on, else None: the dtype attention's output goes back in.

    Under autocast the query and key usually arrive in fp32 (rotary embeddings compute in fp32) and the
    value in bf16; SDPA would then run in the autocast dtype.
    """
    import torch

    low = next((t.dtype for t in (query, key, value) if t.dtype in (torch.bfloat16, torch.float16)), None)
    if low is None and torch.is_autocast_enabled("cpu"):
        low = torch.get_autocast_dtype("cpu")
    return low


def _attend_rows(module, query, key, value, attention_mask, **kwargs):
    """Re-padded rows: the plain form where it applies (fp32 math, any precision), else SDPA as the stage runs it."""
    import torch

    if query.device.type == "cpu" and _plain_form_applies(query, key, kwargs):
        low = _low_precision(query, key, value)
        with torch.autocast("cpu", enabled=False):
            out = _eager_fp32(module, query, key, value, attention_mask, **kwargs)
        return (out if low is None else out.to(low)), None
    return sdpa_fp32_on_cpu(module, query, key, value, attention_mask, **kwargs)


def sdpa_fp32_on_cpu(module, query, key, value, attention_mask, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = kwargs.pop(PACKED_KWARG, None)
    if packed is not None:
        return _attend_packed(module, query, key, value, attention_mask, packed, **kwargs)

    low = _low_precision(query, key, value)
    if low is None or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if _plain_form_applies(query, key, kwargs):
        with torch.autocast("cpu", enabled=False):
            out = _eager_fp32(module, query, key, value, attention_mask, **kwargs)
        return out.to(low), None
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    # additive biases (T5's position_bias) are in the autocast dtype too
    kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(low), weights


def use_fp32_attention(model) -> bool:
    """Switch ``model`` (its SDPA attention) to :func:`sdpa_fp32_on_cpu`; False when it does not use SDPA."""
    global _registered
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not _registered:
        AttentionInterface.register(NAME, sdpa_fp32_on_cpu)
        # without a mask function of its own, transformers builds no mask at all for a custom attention
        # (masking_utils._preprocess_mask_arguments): padding would be attended. SDPA's mask is the one.
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, TypeError, AttributeError):
        return False
    return config._attn_implementation == NAME


def for_plan(model, device: str, precision: str) -> bool:
    """:func:`use_fp32_attention` where it pays (the CPU under bf16/fp16 autocast); returns whether it applied."""
    if device != "cpu" or precision not in ("bf16", "fp16"):
        return False
    return use_fp32_attention(model)
