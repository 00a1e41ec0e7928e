from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefopt.config import FieldError, check_ranges
from prefopt.preference.config import PreferenceFields


@dataclass
class DPOStageConfig(PreferenceFields):
    """The `dpo` stage: DPO / IPO / cDPO (+ RPO's NLL term) in prefopt's own loop (prefopt.preference.loop)."""

    beta: float = 0.1
    """KL strength: 0.1 (DPO paper); 0.01 for the SimPO paper's instruct-model baselines. IPO's tau."""
    loss_type: Literal["sigmoid", "ipo", "cdpo"] = "sigmoid"
    """sigmoid: DPO. ipo: IPO (Azar et al. 2023). cdpo: conservative DPO with `label_smoothing`."""
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a label is flipped, in [0, 0.5) (0.1 is a common choice). Only `loss_type:
    cdpo` reads it; above 0 with another loss it is a config error (it would change nothing)."""
    ipo_per_token: bool = True
    """IPO on per-token log-ratios (each divided by its completion length), as TRL and the IPO authors' experiments;
    false: the paper's summed log-ratios."""
    sft_weight: float = 0.0
    """Weight of an added NLL term on the chosen response (RPO: Pang et al. 2024, 'Iterative Reasoning Preference
    Optimization', Eq. 3, alpha=1), token-level. 0: pure DPO. It keeps the chosen likelihood from falling with the
    rejected one (on the quickstart task pure DPO learns to lengthen answers and loses gold score; docs/methods.md)."""
    reference: Literal["loaded", "precomputed", "lora_base"] = "precomputed"
    """precomputed: one pass of reference log-probs before training, cached under `<experiment>/cache/reference/`
    and reused by reruns, resumes, beta sweeps and other objectives. loaded: a frozen reference model in memory.
    lora_base: the LoRA base with the adapter disabled (needs lora.enabled)."""
    ref_model: str = ""
    """Reference checkpoint when it is not `model` (empty: same as `model`). Must share the policy's tokenizer."""
    reference_cache: str = ""
    """A reference log-prob file to use instead of the keyed one in the experiment cache (empty: the cache). A
    file made for another key is an error."""
    learning_rate: float = 5e-5
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 16
    max_grad_norm: float = 0.0
    """Clip gradients to this global norm; 0 disables clipping. Off by default for DPO: on the small gold task
    clipping at 1.0 cost gold score (docs/methods.md); the GPU recipes set 1.0 as the papers did."""

    def __post_init__(self):
        super().__post_init__()
        # beta <= 0 flips or removes the KL term; label_smoothing 0.5 makes every label a coin flip
        check_ranges(self, beta=dict(gt=0), label_smoothing=dict(ge=0, lt=0.5), sft_weight=dict(ge=0))
        if self.label_smoothing > 0 and self.loss_type != "cdpo":
            raise FieldError("label_smoothing", f"{self.label_smoothing:g} does nothing with loss_type "
                             f"'{self.loss_type}' (only loss_type: cdpo reads it); set loss_type: cdpo, or "
                             "label_smoothing: 0")
        if self.reference == "lora_base" and not self.lora.enabled:
            raise ValueError("reference: 'lora_base' needs lora.enabled: true (no adapter to disable otherwise)")
