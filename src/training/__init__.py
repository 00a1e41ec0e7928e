"""Training helpers every training stage shares: the training fields and LoRA spec (fields.py, config-level: no
runtime imports), the LoRA config (lora.py), the Trainer stages' TrainingArguments (trainer.py) and checkpoint finder
(checkpoints.py)."""
