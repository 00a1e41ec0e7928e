"""Scoring in batches of similar length: each scorer says how to score one batch, this says which texts go together."""

from __future__ import annotations

from typing import Callable, Sequence


def by_length(lengths: Sequence[int], batch_size: int, score_batch: Callable[[list[int]], Sequence[float]],
              progress=None) -> list[float]:
    """score_batch(indices) -> their scores, called on batches of texts sorted by length (so a batch pads little);
    the scores come back in input order. `progress` (a tqdm bar) moves as each batch finishes."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out = [0.0] * len(lengths)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, s in zip(idx, score_batch(idx)):
            out[i] = s
        if progress is not None:
            progress.update(len(idx))
    return out
