"""Supervised fine-tuning's objective: the negative log-likelihood of the completion tokens, prompt tokens masked.
`prefopt.preference.loop` calls `sft_loss` at every micro-batch of the `sft` stage.

The normalisation is TRL SFTTrainer's (transformers' `num_items_in_batch`), so TRL stays the oracle
(tests/test_sft_loop.py): the summed NLL of a micro-batch is divided by the number of completion tokens of the whole
optimizer step (every micro-batch of the accumulation, every process), not by each sequence's own length, so a
long answer weighs more than a short one, token for token. The loop passes that count already divided by
(processes x accumulation steps) as `tokens_per_share`: DDP's mean over processes and accumulate's division of each
micro-batch's loss then turn the micro-batch losses into the mean over the step's tokens.
"""

from __future__ import annotations

import torch


def sft_loss(sequence_logps: torch.Tensor,
             tokens_per_share: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Completion-only NLL, token mean over the optimizer step (Ouyang et al. 2022, SFT; TRL's `nll` loss):

        L = -(1 / N) * sum_{i in step} sum_{t in completion_i} log pi(y_t | x_i, y_<t)

    sequence_logps: (B,) each sequence's summed completion log-probs (the EOS / turn-end token included);
    tokens_per_share: N / (processes x accumulation steps), N the completion tokens of the whole step. Returns this
    micro-batch's share, -sum(sequence_logps) / tokens_per_share (the step's L once the processes' shares are
    averaged and the accumulation's summed), and no metrics beyond the loss."""
    return -sequence_logps.sum() / tokens_per_share.clamp(min=1e-8), {}  # a step without completion tokens: 0
