"""The reward model's objective as a pure function, and the shared loop's objectives built on it for both kinds
(TRL's RewardTrainer, the classifier's oracle, computes the same loss; tests/test_losses.py checks the arithmetic)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefopt.scoring.likelihood import likelihood_reward


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise loss (Bradley & Terry 1952; Ouyang et al. 2022, "Training language models to follow
    instructions with human feedback", Eq. 1):

        L = -log sigma( r(x, y_w) - r(x, y_l) [- m] )

    with an optional per-pair margin m (Llama 2, Touvron et al. 2023, Eq. 2). Inputs (B,); returns the batch mean
    and detached metrics: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies."""
    diff = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(diff - margin if margin is not None else diff).mean()
    diff = diff.detach()
    return loss, {"rewards/chosen": chosen_rewards.detach().mean(), "rewards/rejected": rejected_rewards.detach().mean(),
                  "rewards/margins": diff.mean(), "rewards/accuracies": (diff > 0).float().mean()}


def likelihood_objective(beta: float):
    """The preference loop's objective for `reward.kind: likelihood`: Bradley-Terry on the likelihood rewards
    (prefopt.scoring.likelihood.likelihood_reward) of chosen and rejected."""

    def fn(pi, _ref=None):
        return bradley_terry_loss(likelihood_reward(pi.chosen, pi.chosen_lengths, beta),
                                  likelihood_reward(pi.rejected, pi.rejected_lengths, beta))

    return fn


def classifier_objective(pi, _ref=None):
    """The preference loop's objective for `reward.kind: classifier`: Bradley-Terry on the classifier's rewards of
    chosen and rejected (prefopt.preference.rewards.PairRewards)."""
    return bradley_terry_loss(pi.chosen, pi.rejected)
