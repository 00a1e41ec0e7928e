"""SimPO: a reference-free, length-normalised preference objective.

Deviation from the paper's notation: the target margin is given as gamma_beta_ratio = gamma / beta, as in the
SimPO repository's code (scripts/simpo_trainer.py: `logits = pi_logratios - gamma_beta_ratio`, then
`-logsigmoid(beta * logits)`), so gamma = gamma_beta_ratio * beta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefopt.dpo.loss import preference_metrics


def simpo_loss(
    policy_chosen_logps_avg: torch.Tensor,
    policy_rejected_logps_avg: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float,
    sft_weight: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO, Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6:

        L = -log sigma( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma ),   gamma = gamma_beta_ratio * beta

    i.e. -logsigmoid(beta * (avg_w - avg_l - gamma_beta_ratio)) on the per-token average log-probs (B,).
    With sft_weight > 0 the SimPO repo's optional term sft_weight * chosen_nll is added (chosen_nll: the mean
    per-token NLL of the chosen responses, a scalar or (B,)).
    Rewards logged are the implicit rewards beta * avg log-prob.
    """
    logits = policy_chosen_logps_avg - policy_rejected_logps_avg - gamma_beta_ratio
    losses = -F.logsigmoid(beta * logits)
    loss = losses.mean()
    metrics = preference_metrics(beta * policy_chosen_logps_avg, beta * policy_rejected_logps_avg,
                                 policy_chosen_logps_avg, policy_rejected_logps_avg)
    if sft_weight > 0:
        if chosen_nll is None:
            raise ValueError("sft_weight > 0 needs chosen_nll")
        sft = chosen_nll.mean()
        loss = loss + sft_weight * sft
        metrics["sft_loss"] = sft.detach()
    return loss, metrics
