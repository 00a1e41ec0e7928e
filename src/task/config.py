from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskConfig:
    """The `task` stage: writes the experiment's data files for a task whose gold reward a program computes."""

    name: str = "sort"
    """A built-in task: `sort` (order digits), `reverse` (reverse letters), `lookup` (values of keys in a table);
    `none`: no task data (the experiment names real datasets)."""
    module: str = ""
    """A task of your own: an importable module (`mypkg.mytask`) with the GoldTask parts or make_data +
    gold_score (docs/tasks.md). Overrides `name`."""
    options: dict[str, Any] = field(default_factory=dict)
    """Free-form settings a user's task reads from `cfg.options`."""
    num_sft: int = 2000
    """SFT demonstrations."""
    demo_accuracy: float = 0.6
    """Fraction of SFT demonstrations that are correct; the rest carry realistic mistakes."""
    num_prompts: int = 512
    """Training prompts: the policy samples candidates for them (generate) and PPO rolls out on them."""
    num_val_prompts: int = 200
    """Validation prompts: choose hyperparameters and run sweeps on these (`evaluate.split: validation`)."""
    num_test_prompts: int = 200
    """Test prompts: the figures the final table reports (`evaluate.split: test`); never tune on them."""
    num_preferences: int = 2000
    """Pairs labelled by the simulated annotator, the reward model's training data."""
    annotator_noise: float = 0.1
    """Probability that the simulated annotator flips its label (AlpacaFarm-style label noise); 0.5 = random labels."""
    min_len: int = 3
    """Smallest input (list length, table size) of the built-in tasks."""
    max_len: int = 6
    """Largest input of the built-in tasks."""
    distinct: bool = False
    """Inputs without repeated items (sort: max_len <= 10 digits). Then every slip (an item added, dropped,
    replaced or repeated) is visible by looking items up in the input: a tiny reward model can learn to see it."""

    def __post_init__(self):
        if self.name == "sort" and not self.module and self.distinct and self.max_len > 10:
            raise ValueError("task.distinct needs max_len <= 10 for sort (there are ten digits)")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"task: need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if not 0.0 <= self.demo_accuracy <= 1.0:
            raise ValueError(f"task.demo_accuracy must be in [0, 1], got {self.demo_accuracy}")
        if not 0.0 <= self.annotator_noise <= 1.0:
            raise ValueError(f"task.annotator_noise must be in [0, 1], got {self.annotator_noise}")
        for k in ("num_sft", "num_prompts", "num_val_prompts", "num_test_prompts", "num_preferences"):
            if getattr(self, k) < 0:
                raise ValueError(f"task.{k} must be >= 0, got {getattr(self, k)}")
