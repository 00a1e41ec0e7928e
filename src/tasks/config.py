from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TaskConfig:
    """The `task` stage: writes the experiment's data files for a task whose gold reward a program computes."""

    name: Literal["sort", "none"] = "sort"
    """`sort`: sort a list of digits (Alpaca format, gold score known). `none`: no task data (real datasets)."""
    num_sft: int = 2000
    """SFT demonstrations."""
    demo_accuracy: float = 0.6
    """Fraction of SFT demonstrations that are correct; the rest carry realistic mistakes."""
    num_prompts: int = 512
    """Prompts the policy samples candidates for (generate, PPO rollouts)."""
    num_eval_prompts: int = 200
    """Held-out prompts for evaluation."""
    num_preferences: int = 2000
    """Pairs labelled by the simulated annotator, the reward model's training data."""
    annotator_noise: float = 0.1
    """Probability that the simulated annotator flips its label (AlpacaFarm-style label noise)."""
    min_len: int = 3
    """Shortest list to sort."""
    max_len: int = 6
    distinct: bool = False
    """Inputs of distinct digits (max_len <= 10). Then every slip (a digit added, dropped, replaced or repeated) is
    visible by looking digits up in the input, without counting: a tiny reward model can learn to see it."""

    def __post_init__(self):
        if self.distinct and self.max_len > 10:
            raise ValueError("task.distinct needs max_len <= 10 (there are ten digits)")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"task: need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
    """Longest list to sort."""
