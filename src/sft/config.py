from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from prefopt.config import check_range
from prefopt.data.spec import DatasetSpec
from prefopt.training.fields import LoraSpec, TrainFields


@dataclass
class SFTStageConfig(TrainFields):
    """The `sft` stage: TRL's SFTTrainer, loss on completion tokens only. Any trl.SFTConfig field passes through."""

    TRL_CONFIG = "trl.SFTConfig"

    model: str = "stage:base"
    """The model to fine-tune: `stage:base`, a local folder or a hub id."""
    dataset: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="stage:task/sft.jsonl"))
    """Instruction data (Alpaca JSON, prompt/completion, messages or ShareGPT)."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """Prompt template: `alpaca` for base models, `chat` for the tokenizer's chat template."""
    eval_fraction: float = 0.0
    """Hold out this fraction of the data for an eval loss."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA adapter (PEFT); the saved model has the adapter merged so later stages load a plain checkpoint."""
    learning_rate: float = 1e-3
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 32
    trainer_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        check_range(self, "eval_fraction", ge=0, lt=1)
