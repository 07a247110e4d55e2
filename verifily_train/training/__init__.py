"""Model loading, tokenization, LoRA and the HF Trainer loop (imports torch: keep out of CLI start-up)."""
