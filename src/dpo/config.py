from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from prefopt.config import check_ranges
from prefopt.models_config import LoraSpec
from prefopt.train_args import TrainFields


@dataclass
class DPOStageConfig(TrainFields):
    """The `dpo` stage (TRL's DPOTrainer). Any trl.DPOConfig field passes through."""

    TRL_CONFIG = "trl.DPOConfig"

    model: str = "stage:sft"
    """The policy to align (also the reference unless `ref_model` is set)."""
    pairs: str = "stage:pairs"
    """Preference pairs: `stage:pairs` or a preference file."""
    template: Literal["alpaca", "chat"] = "alpaca"
    beta: float = 0.1
    """KL strength: 0.1 (DPO paper); 0.01 for the SimPO paper's instruct-model baselines."""
    loss_type: Literal["sigmoid", "ipo", "cdpo"] = "sigmoid"
    """sigmoid: DPO. ipo: IPO (Azar et al. 2023). cdpo: conservative DPO with `label_smoothing`."""
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a label is flipped (0.1 is a common choice)."""
    sft_weight: float = 0.0
    """Weight of an added NLL term on the chosen response (RPO: Pang et al. 2024, 'Iterative Reasoning Preference
    Optimization', Eq. 3, alpha=1). 0: pure DPO. It keeps the chosen likelihood from falling with the rejected one
    (on the quickstart task pure DPO learns to lengthen answers and loses gold score; see docs/methods.md)."""
    reference: Literal["loaded", "precomputed", "lora_base"] = "precomputed"
    """loaded: keep a frozen reference model in memory. precomputed: one pass of reference log-probs before
    training, then drop the model. lora_base: the LoRA base with the adapter disabled (needs lora.enabled)."""
    ref_model: str = ""
    """Reference checkpoint when it is not `model` (empty: same as `model`)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    learning_rate: float = 5e-5
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 16
    max_grad_norm: float = 0.0
    """Clip gradients to this global norm; 0 disables clipping. Off by default for DPO: on the small gold task
    clipping at 1.0 cost gold score (docs/methods.md, "DPO through TRL"); the GPU recipes set 1.0 as the papers did."""
    trainer_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        # beta <= 0 flips or removes the KL term; label_smoothing 0.5 makes every label a coin flip
        check_ranges(self, beta=dict(gt=0), label_smoothing=dict(ge=0, lt=0.5), sft_weight=dict(ge=0))
        if self.reference == "lora_base" and not self.lora.enabled:
            raise ValueError("reference: 'lora_base' needs lora.enabled: true (no adapter to disable otherwise)")
