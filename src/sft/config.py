from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from prefopt.config import FieldError, check_range, check_ranges
from prefopt.data.spec import DatasetSpec
from prefopt.training.fields import LoraSpec, TrainFields


@dataclass
class SFTStageConfig(TrainFields):
    """The `sft` stage: completion-only SFT in prefopt's training loop (prefopt.preference.loop), or TRL's SFTTrainer
    with `backend: trl`, whose every trl.SFTConfig field then passes through."""

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
    backend: Literal["prefopt", "trl"] = "prefopt"
    """`prefopt`: the shared training loop (padding-free, resumable, FSDP2); `trl`: TRL's SFTTrainer (padded, the
    reference the loop's loss curve is tested against: tests/test_sft_loop.py). Both train the same tokens with the
    same loss (NLL summed over the step's completion tokens over their count)."""
    layout: Literal["padded", "packed", "prefix_tree"] = "prefix_tree"
    """Token layout of a batch (backend prefopt): `prefix_tree` lays the batch's examples in one row, sorted, each
    computed from the end of the longest prefix it shares with the one before, so a template, a system prompt or a
    repeated question is computed once per batch (the quickstart's Alpaca preamble: 60% of its tokens); `packed`
    puts them side by side in one row, position ids restarting at 0 for each; both compute each example's attention
    on its own (models/varlen.py), so no compute goes to padding; `padded` right-pads every example to the longest
    (what TRL does). Same loss and gradients to float rounding. On a GPU with flash attention: `packed` (flash
    reads the packing from the position ids but cannot take a shared prefix)."""
    logps_chunk_size: int = 512
    """Project hidden states to the vocabulary this many completion tokens at a time, recomputed in backward
    (backend prefopt; 0: in one piece): the (tokens x vocab) float32 logits never exist at once."""
    learning_rate: float = 1e-3
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 32
    trainer_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        check_range(self, "eval_fraction", ge=0, lt=1)
        check_ranges(self, logps_chunk_size=dict(ge=0))
        if self.trainer_args and self.backend != "trl":
            raise FieldError(sorted(self.trainer_args)[0], "is a trl.SFTConfig field: it applies with sft.backend=trl "
                             "only (the prefopt loop sets its own training arguments)")
