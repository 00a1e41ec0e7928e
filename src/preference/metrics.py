"""What every paired objective shares: the metric names and meanings, and the NLL term (RPO / SimPO `sft_weight` /
ORPO), defined once.

Metric names, the same for every objective (a notebook compares any two runs without a mapping table):
  rewards/chosen, rewards/rejected  the objective's implicit reward of each response, batch mean
  rewards/margins, rewards/accuracies  chosen minus rejected reward; fraction of pairs where chosen wins
  logps/chosen, logps/rejected  SUMMED completion log-prob log pi(y|x) (always a sum, whatever the objective uses)
  logps_per_token/chosen, .../rejected  the same divided by the completion length (SimPO's and ORPO's quantity)
  length/chosen, length/rejected  completion tokens (EOS included)
  nll  the token-level NLL of the chosen completions, logged whether or not it is in the loss
"""

from __future__ import annotations

import torch


def chosen_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Token-level NLL of the chosen completions: -sum_i log pi(y_w^i|x^i) / sum_i |y_w^i|.

    Every chosen token of the batch weighs the same (a long answer counts more than a short one), as in the SimPO
    repository's `sft_weight` term, TRL's DPO `sft` loss, and ORPO's L_SFT (which is the model's mean
    cross-entropy over the chosen tokens). Not a mean of per-sequence means. Inputs (B,), output a scalar."""
    return -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                       rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor | None = None,
                       rejected_lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The metrics above as detached batch means. `chosen_logps`/`rejected_logps` are summed log-probs (B,)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    chosen_logps, rejected_logps = chosen_logps.detach(), rejected_logps.detach()
    out = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }
    if chosen_lengths is not None and rejected_lengths is not None:
        lc, lr = chosen_lengths.detach().to(chosen_logps.dtype), rejected_lengths.detach().to(chosen_logps.dtype)
        out.update({
            "logps_per_token/chosen": (chosen_logps / lc.clamp(min=1)).mean(),
            "logps_per_token/rejected": (rejected_logps / lr.clamp(min=1)).mean(),
            "length/chosen": lc.mean(),
            "length/rejected": lr.mean(),
            "nll": chosen_nll(chosen_logps, lc),
        })
    return out


def check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
