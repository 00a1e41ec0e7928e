"""The one LoRA config every training stage builds from its `lora` section (PEFT)."""

from __future__ import annotations


def lora_config(spec, task_type: str):
    """PEFT's LoraConfig from a `LoraSpec`. task_type "CAUSAL_LM" for a policy, "SEQ_CLS" for a classifier reward
    model (which keeps the new score head trainable through PEFT's modules_to_save)."""
    from peft import LoraConfig

    targets = spec.target_modules
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, task_type=task_type,
                      target_modules="all-linear" if targets == ["all-linear"] else list(targets))
