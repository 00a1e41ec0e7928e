"""Training helpers every training stage shares: the training fields and LoRA spec (fields.py, config-level: no
runtime imports), the LoRA config (lora.py) and the Trainer stages' checkpoint finder (checkpoints.py)."""
