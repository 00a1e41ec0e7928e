from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefopt.data.spec import DatasetSpec


@dataclass
class PPOConfig:
    """The `ppo` stage: PPO with a learned reward model (Ouyang et al. 2022; Huang et al. 2024 'N+ details')."""

    policy: str = "stage:sft"
    """Policy to optimise; also the frozen reference."""
    reward_model: str = "stage:reward"
    value_init: Literal["reward", "policy"] = "reward"
    """Initialise the value model from the reward model (InstructGPT) or from the policy."""
    prompts: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="stage:task/prompts.jsonl"))
    template: Literal["alpaca", "chat"] = "alpaca"
    total_episodes: int = 2048
    """Responses sampled over the whole run."""
    rollout_batch_size: int = 64
    """Prompts per rollout (one response each)."""
    mini_batch_size: int = 16
    """Responses per optimiser step inside a PPO epoch."""
    ppo_epochs: int = 4
    """Passes over each rollout."""
    learning_rate: float = 1e-4
    value_learning_rate: float = 1e-4
    max_new_tokens: int = 32
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient (initial value when adaptive)."""
    kl_target: float = 0.0
    """> 0: adapt kl_coef toward this KL (Ziegler et al. 2019); 0: fixed coefficient."""
    kl_horizon: int = 10000
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of responses that never emit EOS."""
    max_grad_norm: float = 1.0
    save_every: int = 10
    """Checkpoint every this many PPO iterations (policy, value, optimizers, KL controller, RNG)."""
