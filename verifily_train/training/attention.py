"""Attention in fp32 under CPU bf16 autocast: PyTorch's bf16 CPU attention kernel is the slow part there.

Profiled on this project's CPU (Xeon with AVX512-BF16/AMX, torch 2.13, SmolLM2-135M LoRA, 1 thread): under
bf16 autocast the matrix products took half their fp32 time, but ``scaled_dot_product_attention``'s CPU
flash kernel took 2.02 s against 0.30 s in fp32, eating the gain. This attention function casts the
(small) query, key and value to fp32, runs the same SDPA kernel there, and casts the output back, so
the projections and MLP keep bf16's speed and attention keeps fp32's (and fp32's precision).
It is registered with transformers' ``AttentionInterface`` and used only on the CPU under bf16/fp16;
anywhere else it is plain SDPA.
"""

from __future__ import annotations

NAME = "verifily_sdpa_fp32_cpu"
_registered = False


def sdpa_fp32_on_cpu(module, query, key, value, attention_mask, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    low = query.dtype in (torch.bfloat16, torch.float16)
    if not (low and query.device.type == "cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    # additive biases (T5's position_bias) are in the autocast dtype too
    kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(query.dtype), weights


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
