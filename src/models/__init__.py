"""Models: loading and saving checkpoints, tokenizers, placing frozen models (loading.py), which architectures are
checked (architectures.py)."""
