"""Training fields every training stage shares (and the LoRA spec), with defaults chosen for the tiny CPU runs
and stated explicitly. Config-level: nothing here imports torch or transformers.

TRL's own configs default to gradient checkpointing on, bf16 on, DPO lr 1e-6 and max_length 1024; prefopt sets
each of these itself so an experiment YAML says what it runs. The GPU recipes under experiments/ set them to the
papers' values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefopt.config import check_choice, check_range, check_ranges

# transformers' SchedulerType values (tests/test_bad_inputs.py checks this list against the installed transformers;
# kept here so that loading a config does not import transformers)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")


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
    """Checkpoint every this many optimizer steps (a killed run resumes from the last one whose hashes verify; a
    SIGTERM, SIGINT or SIGUSR1 also saves one, at the step it arrives, and stops)."""
    save_total_limit: int = 2
    """Keep at most this many intermediate checkpoints (0: keep all). The preference loop keeps at least 2, so a
    damaged newest checkpoint has one to fall back to."""
    recipe_global_batch: int = 0
    """The global batch the recipe (paper) states; `prefopt check` warns when the launch gives another. 0: none."""
    peak_tflops: float = 0.0
    """One device's peak TFLOP/s that the stage's MFU (`perf/mfu`) is measured against. 0: measured at the start
    by a ~0.2 s matrix-product probe in the run's dtype (prefopt.training.throughput); a datasheet figure
    (H100 SXM bf16 dense: 989) gives the conventional MFU."""

    def __post_init__(self):
        # a negative or NaN value here used to train silently (0 steps) or crash deep inside torch
        check_ranges(self, learning_rate=dict(gt=0), per_device_train_batch_size=dict(ge=1),
                     gradient_accumulation_steps=dict(ge=1), warmup_ratio=dict(ge=0, lt=1), weight_decay=dict(ge=0),
                     max_grad_norm=dict(ge=0), max_length=dict(ge=1), logging_steps=dict(ge=1), save_steps=dict(ge=1),
                     save_total_limit=dict(ge=0), recipe_global_batch=dict(ge=0), max_steps=dict(ge=-1),
                     peak_tflops=dict(ge=0))
        if self.max_steps <= 0:  # epochs decide the length only when max_steps does not
            check_range(self, "num_train_epochs", gt=0)
        else:
            check_range(self, "num_train_epochs", ge=0)
        check_choice(self, "lr_scheduler_type", SCHEDULERS)

    def global_batch(self, num_processes: int = 1) -> int:
        return num_processes * self.per_device_train_batch_size * self.gradient_accumulation_steps


@dataclass
class LoraSpec:
    enabled: bool = False
    """Train a LoRA adapter (PEFT) instead of all weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt ('all-linear' as the single entry adapts every linear layer)."""

    def __post_init__(self):
        check_ranges(self, r=dict(ge=1), alpha=dict(gt=0), dropout=dict(ge=0, lt=1))
