"""Training fields every training stage shares, with defaults chosen for the tiny CPU runs and stated explicitly.

TRL's own configs default to gradient checkpointing on, bf16 on, DPO lr 1e-6 and max_length 1024; prefopt sets
each of these itself so an experiment YAML says what it runs. The GPU recipes under experiments/ set them to the
papers' values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainFields:
    learning_rate: float = 5e-5
    """Peak learning rate (AdamW)."""
    num_train_epochs: float = 1.0
    """Passes over the training data."""
    max_steps: int = -1
    """If > 0, stop after this many optimizer steps (overrides num_train_epochs)."""
    per_device_train_batch_size: int = 8
    """Examples per process per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step. Global batch = processes x per-device batch x this."""
    lr_scheduler_type: str = "cosine"
    """transformers scheduler name: linear, cosine, constant, constant_with_warmup, ..."""
    warmup_ratio: float = 0.0
    """Fraction of steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip gradients to this global norm; 0 disables clipping."""
    max_length: int = 512
    """Truncate tokenized examples (prompt + completion) to this many tokens."""
    bf16: bool = False
    """bfloat16 mixed precision (GPU recipes); off on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (large models); off for tiny ones."""
    logging_steps: int = 10
    """Log metrics every this many optimizer steps."""
    save_steps: int = 100
    """Checkpoint every this many optimizer steps (a killed run resumes from the last one)."""
    save_total_limit: int = 2
    """Keep at most this many intermediate checkpoints."""
    recipe_global_batch: int = 0
    """The global batch the recipe (paper) states; `prefopt check` warns when the launch gives another. 0: none."""

    def global_batch(self, num_processes: int = 1) -> int:
        return num_processes * self.per_device_train_batch_size * self.gradient_accumulation_steps
