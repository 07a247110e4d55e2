"""Causal-LM loss computed only where it is defined: the output head runs on label positions alone.

SFT masks the prompt (labels -100), and the output head of a small model is a large share of its work
(SmolLM2-135M: a 49k-token vocabulary against a hidden size of 576). The plain forward computes logits at
every position and throws most of them away; this one gathers the hidden states whose next-token label
is kept and applies the head to those only. Same value as the model's own loss (sum of token
cross-entropies over ``num_items_in_batch``, or their mean), same gradients.
"""

from __future__ import annotations

# families whose CausalLM forward is exactly ``logits = lm_head(decoder(...).last_hidden_state)``:
# no logit soft-capping (gemma2/3), logit scaling (cohere, granite) or extra heads
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


def label_position_loss(model, inputs: dict, num_items_in_batch=None):
    """Next-token cross-entropy over positions whose label is not -100, with the head applied only there."""
    import torch.nn.functional as F

    base = unwrap_causal_lm(model)
    labels = inputs["labels"]
    hidden = base.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = base.lm_head(hidden[:, :-1][keep]).float()  # (kept positions, vocab): fp32 like ForCausalLMLoss
    total = F.cross_entropy(logits, targets[keep], reduction="sum")
    if num_items_in_batch is None:
        return total / keep.sum().clamp(min=1)
    if hasattr(num_items_in_batch, "to"):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
