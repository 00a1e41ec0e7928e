from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefopt.config import FieldError, check_ranges


@dataclass
class PairsConfig:
    """The `pairs` stage: turn scored candidates into chosen/rejected pairs."""

    generate: str = "stage:generate"
    """The generate stage (or folder) whose candidate shards are paired."""
    score: str = "stage:score"
    """The score stage (or folder) holding one score per candidate, joined on prompt_id."""
    strategy: Literal["best_vs_worst", "best_vs_random", "all_pairs", "best_vs_z"] = "best_vs_worst"
    """best_vs_worst: the SimPO recipe. best_vs_random: best against a random other. all_pairs: every pair above
    `margin`. best_vs_z: best against the candidate scored nearest mu + rejected_z * sigma of the prompt's scores
    (Xiao et al. 2025, arXiv 2502.16825). best_vs_worst stays the default: at the quickstart's 8 candidates the two
    build the same pairs; at 32, DPO on best_vs_worst's pairs had +0.010 gold [+0.003, +0.016] over best_vs_z's
    (sort, validation, 3 seeds, Holm p 0.026; docs/methods.md, "Pairs from the reward distribution")."""
    margin: float = 0.0
    """Drop pairs whose score difference is at most this (ties and near-ties)."""
    max_pairs_per_prompt: int = 1
    """At most k pairs per prompt (best_vs_worst always gives at most one)."""
    seed: int = 0
    """Seeds best_vs_random's draw, together with the experiment seed and the prompt id."""
    rejected_z: float = -2.0
    """best_vs_z: where the rejected answer sits in the prompt's score distribution, in standard deviations from
    the mean. -2: the paper's best of seven positions (min, mu - 2 sigma, ..., max) on AlpacaEval 2."""

    def __post_init__(self):
        check_ranges(self, margin=dict(), max_pairs_per_prompt=dict(ge=1), rejected_z=dict())
        if self.rejected_z != -2.0 and self.strategy != "best_vs_z":
            raise FieldError("rejected_z", f"is read only by strategy best_vs_z, not {self.strategy!r}; set "
                                           "strategy: best_vs_z or leave rejected_z out")
