"""Right padding, the one layout every batch of token rows in prefopt uses (PPO's rollouts, the preference pairs,
the response log-prob batches, the judge): row i's tokens at positions 0..len-1, `pad_id` after them. Position ids
stay 0, 1, 2, ... for every row, so no model needs them passed."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids, attention_mask), both long (B, T), T the longest row (at least 1)."""
    T = max([len(r) for r in rows] + [1])
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        attention_mask[i, : len(r)] = 1
    return input_ids, attention_mask
