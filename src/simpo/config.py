from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefopt.config import check_ranges
from prefopt.preference.config import PreferenceFields


@dataclass
class SimPOConfig(PreferenceFields):
    """The `simpo` stage: reference-free objectives (SimPO, ORPO) in prefopt's own loop (prefopt.preference.loop)."""

    loss_type: Literal["simpo", "orpo"] = "simpo"
    """simpo: SimPO (Meng et al. 2024). orpo: ORPO (Hong et al. 2024): NLL + beta * odds-ratio term."""
    beta: float = 2.0
    """SimPO reward scale beta: 2.0-2.5 in the paper's base/instruct setups (10 for gemma-2-9b-it).
    ORPO's lambda: 0.1 in the ORPO paper (TRL's default); set it explicitly for loss_type orpo."""
    gamma_beta_ratio: float = 0.5
    """SimPO target margin as gamma/beta, the SimPO code's parameterisation (0.5 gemma-2-9b-it, 0.55 llama-3-8b-it)."""
    sft_weight: float = 0.0
    """SimPO: weight of an added token-level NLL term on the chosen response (0: pure SimPO). ORPO always has it."""
    learning_rate: float = 5e-5
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 16

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self, beta=dict(gt=0), gamma_beta_ratio=dict(ge=0), sft_weight=dict(ge=0))
