"""The reward-model gate: `prefopt run` stops before any stage that uses the reward model unless the model's
held-out pairwise accuracy is above `reward.min_eval_accuracy` beyond noise: the lower end of its 95% interval
(accuracy - 1.96 standard errors over the test pairs) must reach the floor.

Why the interval and not the point estimate: on the `lookup` task the reward model measured 0.680 ± 0.023 on 400
test pairs, a figure 0.65 is inside the noise of, and the aligners trained on its pairs gained +0.02 to +0.05 gold
while its own win rates said 0.67-0.70 "better" (docs/methods.md). A floor the reward model only touches by
chance is not a floor.

A reward model near chance (0.5) ranks candidates at random: the pairs built from its scores are near random and
DPO, SimPO and PPO then optimise noise, while the reward model's own win rates still say "better". The gate is the
last line of defence; the reward stage's early stopping and defaults are the plan.

The standard error is the one the reward stage records, clustered by prompt (reward.recipe.clustered_se): pairs
that share a prompt are not independent evidence, and a preference file with several pairs per prompt would make
an SE over pairs too small and the gate too easy to pass.
"""

from __future__ import annotations

from prefopt.runtime.exits import Reported

EXIT_CODE = 5
Z = 1.96
"""Standard errors below the measured accuracy that must still reach the floor (a two-sided 95% interval)."""


class RewardGateError(Reported):
    """The reward model is below the accuracy floor; `prefopt run` exits with EXIT_CODE."""

    def __init__(self, message: str):
        super().__init__(EXIT_CODE, message)


def lower_bound(summary: dict) -> float | None:
    """The gate's figure: held-out accuracy - Z standard errors clustered by prompt (`eval/accuracy_se`; the
    accuracy itself when no SE was recorded)."""
    acc = summary.get("eval/accuracy")
    if acc is None:
        return None
    return acc - Z * (summary.get("eval/accuracy_se") or 0.0)


def gate_message(summary: dict, floor: float, where: str = "") -> str | None:
    """None when the reward model passes (or the gate is off, floor 0, or no held-out figure exists); else the
    one-line message saying what was measured, what it means and what to try."""
    low = lower_bound(summary)
    if floor <= 0 or low is None or low >= floor:
        return None
    acc, se = summary["eval/accuracy"], summary.get("eval/accuracy_se")
    n, prompts = summary.get("eval/pairs"), summary.get("eval/prompts")
    fig = f"{acc:.3f}" + (f" ± {se:.3f}" if se is not None else "") + (f" on {n} held-out pairs" if n else "")
    if prompts:
        fig += f" of {prompts} prompts (standard error clustered by prompt)"
    verdict = ("is below" if acc < floor else "is not above")
    noise = "" if acc < floor else f" beyond noise (95% interval down to {low:.3f})"
    return (f"reward model gate{' (' + where + ')' if where else ''}: held-out pairwise accuracy {fig} {verdict} "
            f"reward.min_eval_accuracy={floor:g}{noise}: pairs built from its scores would be little better than "
            "random and the aligners would optimise noise, so the run stops here, before sampling candidates and "
            "the stages that use it. Try more or cleaner preference data, more epochs or another "
            "--reward.learning_rate, a larger reward model, or check the labels; --reward.min_eval_accuracy=0 goes on "
            "anyway.")
