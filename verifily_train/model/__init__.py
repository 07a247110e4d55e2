"""The model runtime shared by training and evaluation: loading, families, device, quantization, attention, LoRA, tokenization (imports torch: keep out of CLI start-up)."""
