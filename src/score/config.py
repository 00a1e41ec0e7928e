"""The `score` stage's section (`score:` in the experiment YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefopt.config import check_ranges


@dataclass
class ScoreConfig:
    """The `score` stage: score every candidate with a reward model, cached by (prompt, response, RM hash)."""

    reward_model: str = "stage:reward"
    """`stage:reward`, or any AutoModelForSequenceClassification folder / hub id (ArmoRM, Skywork-Reward, ...)."""
    reward_fn: str = ""
    """A reward function `module:function` (or `task:gold`, the task's gold score) used instead of the reward
    model: fn(example, response) -> float, example the prompt row (prompt_id, prompt, instruction, input)."""
    candidates: str = "stage:generate"
    """The generate stage whose shards are scored."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """Kept for symmetry with the other stages: candidates arrive with their prompt already rendered by `generate`."""
    batch_size: int = 64
    """(prompt, candidate) texts per reward-model forward pass."""
    trust_remote_code: bool = False
    """Allow a hub reward model's own code (ArmoRM needs it); off unless the config says so."""
    rm_format: Literal["auto", "policy", "chat"] = "auto"
    """What the reward model reads. `policy`: the policy's rendered prompt + response + EOS, as the `reward` stage
    trains on. `chat`: the user's own prompt (the row's instruction and input, or its chat messages) and the
    response as one conversation in the reward model's own chat template and tokenizer, which is how hub reward
    models (Skywork-Reward, ArmoRM) were trained; an error if its tokenizer has no chat template. `auto`: `chat`
    for a classifier prefopt did not train (no `reward_model.json`) whose tokenizer has a chat template, else
    `policy`."""
    max_length: int = 0
    """Truncate prompt + candidate to this many tokens (part of the cache key). 0: the reward model's own limit (its
    config's max_position_embeddings or its tokenizer's model_max_length, the smaller); more than that is an error."""
    data_parallel: int = 1
    """Reward models scoring at once, each in its own process with a whole copy on its own GPU and every N-th shard
    with something left to score; the shards and the score cache are those one process writes. 0: one per visible
    GPU (8 on an 8-GPU node)."""

    def __post_init__(self):
        check_ranges(self, batch_size=dict(ge=1), max_length=dict(ge=0), data_parallel=dict(ge=0))
