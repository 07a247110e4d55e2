"""The last decoder layer of a packed training forward, computed only where its output is read: at label positions.

The label-only head (``training.loss``) reads the final hidden state only at positions whose next token is a
kept label (in SFT the response tokens, a small share of each row). Every earlier layer
feeds the next layer's keys and values at all positions, but the last layer's output goes nowhere else: its
query projection, attention output, output projection, residual, norm and MLP are needed at the label
positions alone. Only its keys and values (every position is a key for some label position) and its input
norm stay whole. The deeper the model, the smaller the share of a step this saves (one layer of many).

Exactness. Every op above is row-wise except attention, which here re-pads the selected queries by row
and attends to the same re-padded keys and values as the whole layer does (``attention.attend_packed_queries``),
so each label position gets the value the whole layer gives it, and the same gradients. LoRA's dropout on
the rows the layer skips is still drawn, then those rows are dropped (``LoraDropout`` below), so the random
stream, and with it every mask of this and later steps, is the one the whole layer draws.

It pays in fp32 only: under bf16 autocast the saved products are the cheap part (bf16 kernels) and oneDNN
builds a kernel for every new row count, so the speed plan takes it in fp32 only
(``training/speed/last_layer_at_labels.py``; docs/models.md, "Speed levers", has the measurements).

Applies to the packed CPU path (the ``pack_rows`` lever) of the families whose registry entry says
``last_layer_at_labels`` (model/registry.py: a decoder layer exactly ``h + mlp(norm2(h + attn(norm1(h))))``
with q/k/v/o and gate/up/down projections). Under gradient checkpointing it stays off (a recomputed forward
would run outside the dropout's row context).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import types

from verifily_train.model.attention import PACKED_KWARG, attend_packed_queries
from verifily_train.model.registry import family_of

MARK = "_verifily_label_rows"  # set on a decoder layer whose forward this module replaced

# (rows of the whole layer's input, indices of the rows computed) while a selected part of the layer runs
_ROWS: contextvars.ContextVar = contextvars.ContextVar("verifily_label_rows", default=None)


def selected_rows():
    """(whole row count, selected row indices) inside a label-rows sub-forward, else None (for LoRA dropout)."""
    return _ROWS.get()


@contextlib.contextmanager
def rows_of(whole: int, select):
    """While it runs, a packed sequence holds rows ``select`` of ``whole``: LoRA dropout draws for all of them.

    Nested (the label rows of the last layer inside a forward whose dead tails were cut, ``training.loss``),
    the selections compose: the rows are always counted against the outermost whole sequence.
    """
    outer = _ROWS.get()
    if outer is not None and outer[1].shape[0] == whole:
        whole, select = outer[0], outer[1].index_select(0, select)
    token = _ROWS.set((whole, select))
    try:
        yield
    finally:
        _ROWS.reset(token)


def _decoder_layers(base):
    """The decoder layers of ``base`` (a ``*ForCausalLM``) where its family's registry entry says, else None."""
    found = base
    for name in family_of(base).decoder_layers.split("."):
        found = getattr(found, name, None)
    return found


def supports(base) -> bool:
    """True when the last decoder layer of ``base`` (a ``*ForCausalLM``) has the structure this forward assumes."""
    layers = _decoder_layers(base)
    if not family_of(base).last_layer_at_labels or not layers:
        return False
    layer = layers[-1]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    needed = [(layer, "input_layernorm"), (layer, "post_attention_layernorm")]
    needed += [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")]
    needed += [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(owner is not None and hasattr(owner, n) for owner, n in needed) and not getattr(
        attn, "attention_dropout", 0.0)


def dropouts_follow_rows(layer) -> bool:
    """True when every LoRA dropout in ``layer`` is off or draws its mask through :func:`selected_rows`."""
    import torch

    for module in layer.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for drop in dropouts.values():
                off = isinstance(drop, torch.nn.Identity) or getattr(drop, "p", 1.0) == 0
                if not (off or getattr(drop, "follows_selected_rows", False)):
                    return False
    return True


def use_label_rows_last_layer(model) -> int:
    """Give the last decoder layer of ``model`` (PEFT-wrapped or not) the label-rows forward; 1 if done, else 0."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not supports(base) or getattr(base, "is_gradient_checkpointing", False):
        return 0
    layer = _decoder_layers(base)[-1]
    if not dropouts_follow_rows(layer):
        return 0
    plain = layer.forward
    layer.forward = types.MethodType(_make_forward(plain), layer)
    setattr(layer, MARK, True)
    return 1


def selects_label_rows(base) -> bool:
    """True when the last decoder layer of ``base`` returns only the rows a packed forward selects."""
    layers = _decoder_layers(base)
    return bool(layers) and getattr(layers[-1], MARK, False)


def _make_forward(plain):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        packed = kwargs.get(PACKED_KWARG)
        select = getattr(packed, "select", None)
        if select is None or hidden_states.shape[0] != 1 or kwargs.get("use_cache"):
            return plain(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                         position_embeddings=position_embeddings, **kwargs)
        return _label_rows_forward(self, hidden_states, attention_mask, position_embeddings, packed)

    return forward


def _rotate_half(attn):
    module = sys.modules.get(type(attn).__module__)
    rotate = getattr(module, "rotate_half", None)
    if rotate is not None:
        return rotate

    def rotate_half(x):
        half = x.shape[-1] // 2
        import torch

        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return rotate_half


def _label_rows_forward(layer, hidden, attention_mask, position_embeddings, packed):
    """The decoder layer at the rows ``packed.select`` of the packed sequence ``hidden`` (1, tokens, hidden)."""
    select, whole = packed.select, hidden.shape[1]
    attn = layer.self_attn
    dim = attn.head_dim
    with rows_of(whole, select):
        normed = layer.input_layernorm(hidden)
        query = attn.q_proj(normed[:, select]).view(1, select.shape[0], -1, dim)
    key = attn.k_proj(normed).view(1, whole, -1, dim)
    value = attn.v_proj(normed).view(1, whole, -1, dim).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:  # qwen3: per-head norms before the rotary embedding
        query, key = attn.q_norm(query), attn.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    cos, sin = position_embeddings
    rotate = _rotate_half(attn)
    cos_q, sin_q = cos[:, select].unsqueeze(1), sin[:, select].unsqueeze(1)
    query = (query * cos_q) + (rotate(query) * sin_q)
    key = (key * cos.unsqueeze(1)) + (rotate(key) * sin.unsqueeze(1))
    out = attend_packed_queries(attn, query, key, value, packed, select, scaling=attn.scaling)  # (1, selected, heads, dim)
    with rows_of(whole, select):
        out = attn.o_proj(out.reshape(1, select.shape[0], -1).contiguous())
        residual = hidden[:, select] + out
        return residual + layer.mlp(layer.post_attention_layernorm(residual))
