"""The scripts a user would otherwise write: bare HF Trainer + PEFT (as the PEFT examples do it) and TRL's SFTTrainer."""
