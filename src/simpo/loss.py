"""The reference-free objectives of the `simpo` stage: SimPO and ORPO, each on summed completion log-probs and
completion lengths (B,). The length normalisation and the NLL term are inside the functions.

Deviations from the papers' notation:
- SimPO's target margin is given as gamma_beta_ratio = gamma / beta, as in the SimPO repository's code
  (scripts/simpo_trainer.py: `logits = pi_logratios - gamma_beta_ratio`, then `-logsigmoid(beta * logits)`).
- SimPO's optional NLL term (the repository's `sft_weight`) is the token-level mean over the batch's chosen
  tokens (`prefopt.preference.metrics.chosen_nll`), as in that repository and TRL.
- ORPO's lambda is called beta here, as TRL calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefopt.preference.metrics import check_beta, chosen_nll, preference_metrics

LOSS_TYPES = ("simpo", "orpo")


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO, Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6:

        L = -log sigma( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma ),   gamma = gamma_beta_ratio * beta

    computed as -logsigmoid(beta * (avg_w - avg_l - gamma_beta_ratio)) with avg = summed log-prob / |y|.
    sft_weight > 0 adds sft_weight * NLL(y_w) (token-level). Rewards logged: beta * avg log-prob.
    """
    check_beta(beta)
    if gamma_beta_ratio < 0:
        raise ValueError(f"gamma_beta_ratio (gamma/beta) must be >= 0, got {gamma_beta_ratio}")
    avg_w = policy_chosen_logps / chosen_lengths.clamp(min=1)
    avg_l = policy_rejected_logps / rejected_lengths.clamp(min=1)
    loss = -F.logsigmoid(beta * (avg_w - avg_l - gamma_beta_ratio)).mean()
    if sft_weight > 0:
        loss = loss + sft_weight * chosen_nll(policy_chosen_logps, chosen_lengths)
    metrics = preference_metrics(beta * avg_w, beta * avg_l, policy_chosen_logps, policy_rejected_logps,
                                 chosen_lengths, rejected_lengths)
    return loss, metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO, Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eqs. 4-7:

        odds(y|x) = P(y|x) / (1 - P(y|x)),  P(y|x) = exp(avg log-prob of y)  (the per-token geometric mean)
        L = NLL(y_w) - lambda * log sigma( log odds(y_w|x) - log odds(y_l|x) ),   lambda = beta

    log odds = avg - log(1 - e^avg). NLL(y_w) is token-level over the batch. Rewards logged: beta * avg log-prob.
    """
    check_beta(beta)
    avg_w = policy_chosen_logps / chosen_lengths.clamp(min=1)
    avg_l = policy_rejected_logps / rejected_lengths.clamp(min=1)
    log_odds = (avg_w - avg_l) - (log1mexp(avg_w) - log1mexp(avg_l))
    loss = chosen_nll(policy_chosen_logps, chosen_lengths) - beta * F.logsigmoid(log_odds).mean()
    metrics = preference_metrics(beta * avg_w, beta * avg_l, policy_chosen_logps, policy_rejected_logps,
                                 chosen_lengths, rejected_lengths)
    metrics["log_odds_ratio"] = log_odds.detach().mean()
    return loss, metrics
