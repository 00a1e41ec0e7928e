"""Shared math on token log-probabilities and masks: PPO's per-token log-probs and whitening, and the plain
full-logits reference (`sequence_logps`) the tests hold every faster path to. Training and evaluation sum
completion log-probs through `prefopt.preference.batching.pair_logps` (chunked, any layout), not here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels[t] | ...) for each position, from logits already aligned with labels.

    logits: (B, T, V), labels: (B, T) -> (B, T). Dividing by the sampling temperature makes these the log-probs
    of the distribution the responses were actually sampled from (PPO needs that)."""
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of the completion tokens of full sequences (prompt + completion).

    input_ids, attention_mask, completion_mask: (B, T); completion_mask is 1 on completion tokens.
    Returns (B, T-1): position t holds log p(input_ids[t+1]), zeroed where input_ids[t+1] is not completion."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    return token_logps(logits, labels, temperature) * mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is added back (reward whitening)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob and completion length of each sequence: (B,), (B,), from the model's full
    logits: the plain reference `pair_logps` is tested against."""
    per_token = completion_logps(model, input_ids, attention_mask, completion_mask)  # (B, T-1), 0 off-completion
    lengths = completion_mask[:, 1:].sum(-1).to(per_token.dtype)
    return per_token.sum(-1), lengths
