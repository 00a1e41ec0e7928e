from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefopt.data.spec import DatasetSpec


@dataclass
class JudgeConfig:
    model: str = ""
    """A local causal LM used as a pairwise judge (empty: no judging)."""
    max_prompts: int = 50
    """Judge at most this many prompts per policy pair."""


@dataclass
class EvaluateConfig:
    """The `evaluate` stage: gold score, RM score, win rate and KL vs SFT, length, optional order-swapped judge."""

    policies: dict[str, str] = field(
        default_factory=lambda: {"sft": "stage:sft", "dpo": "stage:dpo", "simpo": "stage:simpo", "ppo": "stage:ppo"}
    )
    """Name -> model. Names whose stage is not in the experiment's stages are left out."""
    baseline: str = "sft"
    """The policy win rates and KL are measured against."""
    prompts: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="stage:task/eval_prompts.jsonl"))
    template: Literal["alpaca", "chat"] = "alpaca"
    reward_model: str = "stage:reward"
    """Scores responses ('rm_score', RM win rate); empty to skip."""
    task: Literal["auto", "sort", "none"] = "auto"
    """Gold scorer; `auto` uses the experiment's task."""
    samples_per_prompt: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int = 1234
    batch_size: int = 64
    judge: JudgeConfig = field(default_factory=JudgeConfig)
