"""DPO-family objectives on sequence log-probabilities: DPO, IPO and conservative DPO.

Each takes the summed log-probabilities of the chosen and rejected completions under the policy and the reference
(shape (B,)) and returns (loss, metrics). Deviations from the papers:

- IPO is written on whatever log-probs it is given. The paper's h uses sequence log-probs; TRL (and so our `dpo`
  recipe with `loss_type: ipo`) divides each log-ratio by its completion length first, which the IPO authors told
  TRL matches their experiments. Pass per-token averages to reproduce TRL's numbers.
- The rewards logged are beta * log-ratio for every loss type (IPO's tau plays beta's part), as TRL logs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                       rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metric names every aligner logs (batch means, detached)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO and its IPO / conservative variants, on the log-ratio difference

        h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)].

    sigmoid: DPO, Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7:
        L = -log sigma(beta * h)
    cdpo: conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; DPO paper's code), the labels
        flipped with probability eps = label_smoothing:
        L = -(1 - eps) log sigma(beta * h) - eps log sigma(-beta * h)
    ipo: IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
        Eq. 17, with tau = beta:
        L = (h - 1 / (2 tau))^2

    All inputs have shape (B,). Returns the batch-mean loss and detached metrics (rewards = beta * log-ratio).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "cdpo":
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, cdpo or ipo")
    metrics = preference_metrics(beta * chosen_logratios, beta * rejected_logratios, policy_chosen_logps,
                                 policy_rejected_logps)
    return losses.mean(), metrics
