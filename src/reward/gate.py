"""The reward-model gate: `prefopt run` stops before any stage that uses the reward model when the model's
held-out pairwise accuracy is below `reward.min_eval_accuracy`.

A reward model near chance (0.5) ranks candidates at random: the pairs built from its scores are near random and
DPO, SimPO and PPO then optimise noise, while the reward model's own win rates still say "better". The gate is the
last line of defence; the reward stage's early stopping and defaults are the plan.
"""

from __future__ import annotations

EXIT_CODE = 5


class RewardGateError(RuntimeError):
    """The reward model is below the accuracy floor; `prefopt run` exits with EXIT_CODE."""

    exit_code = EXIT_CODE


def gate_message(summary: dict, floor: float, where: str = "") -> str | None:
    """None when the reward model passes (or the gate is off, floor 0, or no held-out figure exists); else the
    one-line message saying what was measured, what it means and what to try."""
    acc = summary.get("eval/accuracy")
    if floor <= 0 or acc is None or acc >= floor:
        return None
    se = summary.get("eval/accuracy_se")
    n = summary.get("eval/pairs")
    fig = f"{acc:.3f}" + (f" ± {se:.3f}" if se is not None else "") + (f" on {n} held-out pairs" if n else "")
    return (f"reward model gate{' (' + where + ')' if where else ''}: held-out pairwise accuracy {fig} is below "
            f"reward.min_eval_accuracy={floor:g}: pairs built from its scores would be near random and the aligners "
            "would optimise noise, so the run stops before the stages that use it. Try more or cleaner preference "
            "data, more epochs or another --reward.learning_rate, a larger reward model, or check the labels; "
            "--reward.min_eval_accuracy=0 goes on anyway.")
