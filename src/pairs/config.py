from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefopt.config import check_ranges


@dataclass
class PairsConfig:
    """The `pairs` stage: turn scored candidates into chosen/rejected pairs."""

    generate: str = "stage:generate"
    """The generate stage (or folder) whose candidate shards are paired."""
    score: str = "stage:score"
    """The score stage (or folder) holding one score per candidate, joined on prompt_id."""
    strategy: Literal["best_vs_worst", "best_vs_random", "all_pairs"] = "best_vs_worst"
    """best_vs_worst: the SimPO recipe. best_vs_random: best against a random other. all_pairs: every pair above
    `margin`."""
    margin: float = 0.0
    """Drop pairs whose score difference is at most this (ties and near-ties)."""
    max_pairs_per_prompt: int = 1
    """At most k pairs per prompt (best_vs_worst always gives at most one)."""
    seed: int = 0
    """Seeds best_vs_random's draw, together with the experiment seed and the prompt id."""

    def __post_init__(self):
        check_ranges(self, margin=dict(), max_pairs_per_prompt=dict(ge=1))
