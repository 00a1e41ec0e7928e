from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefopt.config import check_ranges
from prefopt.train_args import TrainFields


@dataclass
class SimPOConfig(TrainFields):
    """The `simpo` stage: SimPO (Meng et al. 2024), reference-free, written here."""

    model: str = "stage:sft"
    pairs: str = "stage:pairs"
    template: Literal["alpaca", "chat"] = "alpaca"
    beta: float = 2.0
    """Reward scale beta: 2.0-2.5 in the paper's base/instruct setups (10 for gemma-2-9b-it)."""
    gamma_beta_ratio: float = 0.5
    """Target margin as gamma/beta, the SimPO code's parameterisation (0.5 for gemma-2-9b-it, 0.55 llama-3-8b-it)."""
    sft_weight: float = 0.0
    """Weight of an added NLL term on the chosen response (0: pure SimPO)."""
    learning_rate: float = 5e-5
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 16

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self, beta=dict(gt=0), gamma_beta_ratio=dict(ge=0), sft_weight=dict(ge=0))
