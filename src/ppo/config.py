from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefopt.config import FieldError, check_ranges
from prefopt.data.spec import DatasetSpec


@dataclass
class PPOConfig:
    """The `ppo` stage: PPO with a learned reward model (Ouyang et al. 2022; Huang et al. 2024 'N+ details').

    Defaults suit the tiny CPU quickstart (a few-M-parameter Llama, responses <= 16-32 tokens, ~1k episodes).
    Huang et al. 2024 (Pythia 1B-6.9B on TL;DR; TRL's PPOTrainer defaults follow them): kl_coef 0.05, 4 PPO
    epochs, gamma 1, lam 0.95, clip 0.2, vf_coef 0.1, temperature 0.7, missing-EOS penalty; lr ~3e-6."""

    policy: str = "stage:sft"
    """Policy to optimise; also the frozen reference (loaded a second time from the same checkpoint)."""
    reward_model: str = "stage:reward"
    """Reward model: the `reward` stage's model (likelihood or classifier) or a sequence-classification checkpoint."""
    reward_fn: str = ""
    """A reward function `module:function` (or `task:gold`, the task's gold score: the DPO paper's PPO-GT oracle)
    used instead of the reward model: fn(example, response) -> float. The value model then starts from the policy."""
    trust_remote_code: bool = False
    """Let transformers run the reward model's own code from its repository (hub reward models such as ArmoRM
    need it). Only for reward models you trust."""
    rm_format: Literal["auto", "policy", "chat"] = "auto"
    """What the reward model reads, as `score.rm_format`: the policy's rendered prompt + response (`policy`), or the
    raw prompt and response in the reward model's own chat template (`chat`, hub reward models; `auto` decides).
    Responses reach it as text either way, tokenized by its own tokenizer."""
    value_init: Literal["reward", "policy"] = "reward"
    """Initialise the value model from the reward model (InstructGPT; for a likelihood reward model, its trained
    transformer with a fresh head) or from the policy (fresh head). Either way it must share the policy's
    tokenizer: a hub reward model with another vocabulary needs `policy`."""
    prompts: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="stage:task/prompts.jsonl"))
    """Prompts to sample rollouts on (any format the loaders read; only the prompt is used)."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """How a prompt is rendered for the model."""
    total_episodes: int = 1024
    """Responses sampled over the whole run; iterations = total_episodes // rollout_batch_size."""
    rollout_batch_size: int = 64
    """Prompts per rollout (one response each), over all processes: each of N processes samples 1/N of them."""
    mini_batch_size: int = 16
    """Responses per optimiser step inside a PPO epoch, over all processes (each trains on 1/N of them and the
    gradients are averaged)."""
    forward_batch_size: int = 64
    """Responses per no-grad forward pass of the rollout on each process (the reward model's scoring, and the
    policy's, reference's and value model's passes over the samples): TRL's `local_rollout_forward_batch_size`,
    whose default this is. Larger: fewer, fuller passes; the logits of a pass's responses must fit at once."""
    generation_chunk: int = 0
    """Prompts per generation call, each call seeded by its index in the global rollout. 0: each process's whole
    share in one call (fastest). A fixed value that divides rollout_batch_size / N makes the samples, and so the
    run, the same whatever the number of processes N."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """What samples the rollouts: transformers `generate` on the policy, or a vLLM engine on each process's GPU
    (colocated, as TRL's GRPO `vllm_mode: colocate`) given the policy's weights before every rollout."""
    vllm_gpu_memory_utilization: float = 0.3
    """With backend vllm: the share of each GPU the engine's weights and KV cache may take (the rest trains)."""
    vllm_sleep: bool = False
    """With backend vllm: put the engine to sleep (vLLM sleep mode, level 2) between rollouts,
    so the PPO update gets its GPU memory back; the policy's weights are pushed again before each rollout anyway."""
    frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the frozen models (the reference and the reward model). `auto`: the launch's mixed precision (the
    accelerate config's `mixed_precision`: bf16 -> bfloat16, fp16 -> float16); without one, a float32 reference and
    the reward model as the `score` stage loads it (bfloat16 on a GPU). The policy and value model always train in
    float32. A bfloat16 reference halves its memory (16 GB instead of 32 for an 8B policy) but no longer computes
    exactly the policy's log-probs: the KL at step 0 is bf16 rounding, not 0 (float32 keeps it exact)."""
    rm_max_length: int = 0
    """Tokens the reward model reads (prompt + response), as `score.max_length`. 0: the reward model's own limit (its
    config's max_position_embeddings or its tokenizer's model_max_length, the smaller); more than that is an error."""
    shard_reference: bool = True
    """Under FSDP (an accelerate config with `fsdp_version: 2`): shard the frozen reference over the processes as the
    policy is (each holds 1/N of its weights; a forward pass gathers one layer at a time). False: a full copy on
    every process, which saves the gathers when it fits. Without FSDP it is always a full copy."""
    shard_reward_model: bool = True
    """Under FSDP: shard the reward model the same way (a `reward_fn` has nothing to shard). False: a full copy on
    every process."""
    ppo_epochs: int = 4
    """Passes over each rollout (Huang et al. 2024: 4)."""
    learning_rate: float = 5e-5
    """Policy AdamW learning rate (constant). 5e-5 suits a tiny model; ~3e-6 for 1B models (Huang et al. 2024)."""
    value_learning_rate: float = 1e-4
    """Value-model AdamW learning rate (constant)."""
    max_new_tokens: int = 32
    """Response length cap; responses cut here get `missing_eos_penalty`."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling at rollout time (log-probs ignore it: keep 1.0 for exact on-policy log-probs)."""
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient beta (initial value when adaptive)."""
    kl_target: float = 0.0
    """> 0: adapt kl_coef toward this sequence KL (Ziegler et al. 2019 used 6 nats); 0: fixed coefficient."""
    kl_horizon: int = 10000
    """Adaptive KL horizon in episodes (Ziegler et al. 2019: 10000)."""
    cliprange: float = 0.2
    """Policy ratio clip epsilon (Schulman et al. 2017)."""
    cliprange_value: float = 0.2
    """Value clip: new values stay within this of the rollout's values."""
    vf_coef: float = 0.5
    """Weight of the value loss in policy loss + vf_coef * value loss (Huang et al. 2024: 0.1)."""
    gamma: float = 1.0
    """Discount (1: the score at the last token counts fully for every token)."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over each rollout before GAE (keeping their mean)."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of responses that never emit EOS (Huang et al. 2024; TRL subtracts it the same way)."""
    max_grad_norm: float = 1.0
    """Clip each model's gradient to this global norm; 0 disables clipping."""
    save_every: int = 10
    """Checkpoint every this many PPO iterations (policy, value, optimizers, KL controller, RNG, sampler)."""
    keep_snapshots: bool = False
    """Also keep the policy (+ tokenizer) of every checkpoint in `snapshots/iter-N` (resume checkpoints keep only
    the latest two): `evaluate.checkpoints` draws the over-optimisation curve from them."""
    recipe_global_batch: int = 0
    """The responses per iteration (global batch) the recipe states; `prefopt check` warns when the launch gives
    another. 0: none."""

    def __post_init__(self):
        check_ranges(self, rollout_batch_size=dict(ge=1), mini_batch_size=dict(ge=1), total_episodes=dict(ge=1),
                     forward_batch_size=dict(ge=1), ppo_epochs=dict(ge=1), learning_rate=dict(gt=0),
                     value_learning_rate=dict(gt=0),
                     max_new_tokens=dict(ge=1), temperature=dict(gt=0), top_p=dict(gt=0, le=1), kl_coef=dict(ge=0),
                     kl_target=dict(ge=0), kl_horizon=dict(ge=1), cliprange=dict(gt=0), cliprange_value=dict(gt=0),
                     vf_coef=dict(ge=0), gamma=dict(ge=0, le=1), lam=dict(ge=0, le=1), missing_eos_penalty=dict(),
                     max_grad_norm=dict(ge=0), save_every=dict(ge=1), recipe_global_batch=dict(ge=0),
                     generation_chunk=dict(ge=0), vllm_gpu_memory_utilization=dict(gt=0, le=1),
                     rm_max_length=dict(ge=0))
        if self.backend == "vllm":  # PPO's log-probs assume the temperature sampled at is the one asked for
            from prefopt.generation.limits import temperature_problem

            problem = temperature_problem(self.temperature)
            if problem:
                raise FieldError("temperature", f"{problem} (backend: vllm)")
        if self.mini_batch_size > self.rollout_batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be <= rollout_batch_size "
                             f"({self.rollout_batch_size})")
        if self.total_episodes < self.rollout_batch_size:
            raise ValueError(f"total_episodes ({self.total_episodes}) < rollout_batch_size "
                             f"({self.rollout_batch_size}): not one iteration")

    def global_batch(self, num_processes: int = 1) -> int:
        """Responses per PPO iteration: `rollout_batch_size`, which is global (split over the processes)."""
        return self.rollout_batch_size
