"""The prompt's pass before sampling (the prefill), computing what a batch's prompts share once: vLLM's prefix
caching, for the transformers backend.

Both functions fill `cache` with the keys and values of every prompt token but the last, for the B * n rows that
`generate` then continues (row i * n + j: sample j of prompt i, `num_return_sequences`' order); `generate` computes
each prompt's last token itself, as a one-token step against the cache, before it samples. The logits are the
model's own up to float rounding (tests/test_generation.py: the same samples on every family).

  tree_prefill    the batch's prompts as one prefix tree (prefopt.training.prefix_tree), read by varlen attention
                  (a model with SDPA or eager attention): a template or instruction every prompt starts with, and
                  a prompt sampled n times, are computed once. Each row's keys and values are then gathered from
                  the tree's along its path, left-padded as the prompts are.
  shared_prefill  the B prompts as a left-padded batch, the cache repeated to B * n rows: a prompt sampled n times
                  is computed once (any attention, flash included).
"""

from __future__ import annotations

import torch

from prefopt.models import varlen
from prefopt.training.prefix_tree import lay_down


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids generate derives from a left-padded mask: each prompt's first token at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def shared_prefill(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int):
    """Every prompt token but the last through the model at batch B, the cache repeated to B * n rows. Returns
    the expanded (input_ids, attention_mask) for `generate`."""
    am = attention_mask[:, :-1]
    model(input_ids=input_ids[:, :-1], attention_mask=am, position_ids=_positions(am), past_key_values=cache,
          use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(n)
    return input_ids.repeat_interleave(n, dim=0), attention_mask.repeat_interleave(n, dim=0)


def tree_prefill(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int):
    """Every prompt token but the last, the batch's prompts laid down as one prefix tree and computed in one
    varlen pass; each of the B * n rows' keys and values gathered along its prompt's path into `cache` (through
    `cache.update`, so a sliding-window layer keeps what its own prefill would keep). The left padding's slots
    hold any computed token's keys: the attention mask hides them, as it hides the pad tokens' own. Returns the
    expanded (input_ids, attention_mask) for `generate`."""
    from transformers.cache_utils import DynamicCache

    B, T = input_ids.shape
    heads = [row[m.bool()].tolist()[:-1] for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
    # each token j of prompt b as a "target" predicted by itself: lay_down hands back its index in the tree's row
    tree = lay_down([(h, [(j, 0, b) for j in range(len(h))]) for b, h in enumerate(heads)])
    paths: list[list[int]] = [[0] * (T - 1 - len(h)) for h in heads]  # left padding: any computed token
    for index, _, b in tree["targets"]:  # each prompt's tokens in order
        paths[b].append(index)
    gather = torch.tensor(paths, dtype=torch.long)
    device = input_ids.device
    ids = torch.tensor([tree["ids"]], dtype=torch.long, device=device)
    pos = torch.tensor([tree["pos"]], dtype=torch.long, device=device)
    full = DynamicCache()  # plain layers: every layer keeps all the tree's keys (a sliding one would drop some)
    with varlen.switched(model):
        model(input_ids=ids, position_ids=pos, past_key_values=full, use_cache=True, logits_to_keep=1)
    rows = gather.repeat_interleave(n, dim=0).to(device)  # (B * n, T - 1)
    for i, layer in enumerate(full.layers):
        keys, values = (x[0].index_select(1, rows.reshape(-1)).view(x.shape[1], B * n, T - 1, x.shape[-1])
                        .transpose(0, 1) for x in (layer.keys, layer.values))  # (B * n, heads, T - 1, D)
        cache.update(keys, values, i)
    return input_ids.repeat_interleave(n, dim=0), attention_mask.repeat_interleave(n, dim=0)


def can_tree(model) -> bool:
    """Whether the model's attention reads a prefix tree (SDPA or eager, through varlen attention)."""
    return varlen.reads_pieces(model)
