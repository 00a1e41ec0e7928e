"""Config pieces shared by stages that load or adapt a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefopt.config import check_ranges


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
