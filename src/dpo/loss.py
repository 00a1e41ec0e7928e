"""DPO-family objectives on summed sequence log-probabilities: DPO, IPO and conservative DPO, each with RPO's NLL
term as an option. `prefopt.preference.loop` calls this function at every step: what trains is what you read.

Inputs are summed completion log-probs log pi(y|x) of shape (B,) under the policy and the reference, and the
completion lengths |y| (EOS included). Deviations from the papers:

- IPO: the paper's h uses sequence log-probs. With `ipo_per_token=True` each log-ratio is first divided by its
  completion length, as TRL does (the IPO authors told TRL their experiments used this form); the `dpo` stage's
  `ipo_per_token` defaults to True for that reason.
- The NLL term (RPO, Pang et al. 2024) is the token-level mean of `prefopt.preference.metrics.chosen_nll`, as in
  TRL's `sft` loss; the paper divides each sequence's NLL by its own length.
- The rewards logged are beta * (summed) log-ratio for every loss type (IPO's tau plays beta's part), as TRL logs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefopt.preference.metrics import check_beta, chosen_nll, preference_metrics

LOSS_TYPES = ("sigmoid", "ipo", "cdpo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    ipo_per_token: bool = False,
    sft_weight: float = 0.0,
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
        L = (h - 1 / (2 tau))^2            (ipo_per_token: each log-ratio in h divided by its |y| first)
    sft_weight > 0 adds RPO's term, Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 3:
        L += sft_weight * NLL(y_w)          (token-level mean over the batch's chosen tokens)

    All tensors have shape (B,); lengths are needed for ipo_per_token and sft_weight. Returns the batch-mean loss
    and detached metrics (prefopt.preference.metrics; rewards = beta * log-ratio).
    """
    check_beta(beta)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if (ipo_per_token or sft_weight > 0) and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("ipo_per_token and sft_weight need chosen_lengths and rejected_lengths")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "cdpo":
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    else:
        if ipo_per_token:
            h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    if sft_weight > 0:
        loss = loss + sft_weight * chosen_nll(policy_chosen_logps, chosen_lengths)
    metrics = preference_metrics(beta * chosen_logratios, beta * rejected_logratios, policy_chosen_logps,
                                 policy_rejected_logps, chosen_lengths, rejected_lengths)
    return loss, metrics
