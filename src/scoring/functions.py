"""Reward functions: a program in place of a reward model, for checkable tasks (RLVR-style experiments) and as an
oracle that separates reward-model error from optimiser error (the DPO paper's PPO-GT baseline).

    score.reward_fn: mypkg.rewards:exact_match     ppo.reward_fn: task:gold     evaluate.reward_fn: task:gold

A reward function is `fn(example: dict, response: str) -> float`, where `example` is the prompt row: `prompt_id`,
`prompt` (as rendered for the policy) and the row's own fields (`instruction`, `input`, ...). `task:gold` is the
experiment task's gold scorer. Every value is checked: a NaN, an infinity or something that is not one number is an
error naming the function and the prompt id, raised before anything is written.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

from prefopt.gold import TaskError, example


class RewardFunction:
    """A loaded, checked reward function; `name` is what provenance records (`fn:mypkg.rewards:exact_match`)."""

    def __init__(self, spec: str, fn: Callable[[dict, str], float]):
        self.spec, self.fn = spec, fn
        self.name = f"fn:{spec}"

    def __call__(self, rows: list[dict], responses: list[str]) -> list[float]:
        """Scores of `responses`, one per (row, response); rows are prompt rows (loader rows or generation rows)."""
        out = []
        for row, resp in zip(rows, responses):
            ex = example(row)
            try:
                value = self.fn(ex, resp)
            except TaskError as e:
                raise TaskError(f"reward function {self.spec}: {e}") from None
            except Exception as e:  # noqa: BLE001 - a user's function may raise anything: say where
                raise TaskError(f"reward function {self.spec} failed on prompt {ex.get('prompt_id')!r}: "
                                f"{type(e).__name__}: {e}") from e
            number = _one_number(value)
            if number is None:
                raise TaskError(f"reward function {self.spec} returned {str(value)[:60]!r} for prompt "
                                f"{ex.get('prompt_id')!r}: expected one number")
            value = number
            if not math.isfinite(value):
                raise TaskError(f"reward function {self.spec} returned {value} for prompt {ex.get('prompt_id')!r}")
            out.append(value)
        return out


def _one_number(value) -> float | None:
    """float(value) for an int, a float, or a 0-d tensor/array; None for anything else (lists, 1-d tensors, text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if getattr(value, "ndim", None) == 0:
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


def load_reward_function(spec: str, task_cfg=None) -> RewardFunction:
    """`module:function`, or `task:gold` for the experiment task's gold scorer (needs `task_cfg`)."""
    if spec == "task:gold":
        from prefopt.gold import get_task, has_gold

        if task_cfg is None or not has_gold(task_cfg):
            raise TaskError("reward function task:gold needs an experiment with a gold task (task.name or task.module)")
        return RewardFunction(spec, get_task(task_cfg).gold_score)
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise TaskError(f"reward function {spec!r}: expected module:function (e.g. mypkg.rewards:exact_match) or "
                        "task:gold")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise TaskError(f"reward function {spec!r}: module {mod_name!r} cannot be imported: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise TaskError(f"reward function {spec!r}: module {mod_name!r} has no function {fn_name!r}")
    return RewardFunction(spec, fn)
