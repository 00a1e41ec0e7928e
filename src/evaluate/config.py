from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefopt.config import check_ranges
from prefopt.data.spec import DatasetSpec


@dataclass
class JudgeConfig:
    model: str = ""
    """A local causal LM used as a pairwise judge (empty: no judging)."""
    max_prompts: int = 50
    """Judge at most this many prompts per policy pair (the first sample of each policy per prompt)."""
    chat: bool = False
    """Put the judging prompt in the judge tokenizer's chat template (instruct judges); off: plain text."""
    batch_size: int = 8

    def __post_init__(self):
        check_ranges(self, max_prompts=dict(ge=0), batch_size=dict(ge=1))


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
    """Sampling temperature; the KL to the baseline is measured between the distributions at this temperature."""
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int = 1234
    """Sampling seed, the same for every policy."""
    batch_size: int = 64
    """Prompts per generate call; sequences per log-prob / reward-model batch."""
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    """Generation backend; `auto` picks vLLM when it can run. Log-probs always use transformers."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the models loaded for log-probs (float32 on CPU whatever is asked)."""
    rm_max_length: int = 512
    """Tokens the reward model reads (prompt + response), as `score.max_length`."""
    trust_remote_code: bool = False
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self):
        check_ranges(self, samples_per_prompt=dict(ge=1), temperature=dict(ge=0), top_p=dict(gt=0, le=1),
                     max_new_tokens=dict(ge=1), batch_size=dict(ge=1), rm_max_length=dict(ge=1))
