"""Padding-free attention over packed rows on any device: each packed sequence attends to itself alone, so no
(T x T) mask is built and the linear layers compute no padding.

Flash attention's varlen kernels do this on a GPU (transformers reads the sequence starts from the position ids);
SDPA and eager attention have no varlen form, and the masked alternative (one boolean (T, T) mask over a packed row,
prefopt.preference.batching's shared-prompt layout) computes every query against every key of the row and throws
most of it away. Here a row is cut where its position ids restart at 0; the pieces of a length bucket (powers of
two) are gathered as rows of their own, right-padded to the bucket's longest (causal attention never reads that
padding), and each bucket goes through the attention function the model was loaded with, in one call.

The shared prompt (prefopt.preference.batching, `collate(..., masks=False)`) is one packed row too: a drop of the
position ids to p > 0 starts the rejected answer, which continues its pair's first p tokens (the prompt). Its piece
gathers the prompt's keys and values, already rotated at their own positions, followed by its own tokens: an
ordinary causal sequence whose prompt outputs are dropped (the chosen piece computes them). The prompt's linear
layers run once; only its attention runs twice.

  sdpa    transformers' `sdpa_attention_forward` with no mask (is_causal: the fast kernels), or with the bucket's
          causal sliding-window mask when the bucket is longer than the window
  eager   the family's own `eager_attention_forward` (Gemma-2's logit soft-capping lives there) with the bucket's
          additive causal (and sliding-window) mask

A piece computed alone is what a padded row holding only that sequence computes, so the log-probs are the padded
layout's to float rounding on every family the conformance suite builds (tests/test_preference_batching.py,
tests/test_architectures.py).

`use_varlen(model)` switches a loaded model to it (`VARLEN`, registered with transformers' AttentionInterface; the
mask builders then make no mask: the implementation is not one of theirs). A model switched so reads packed rows
only: a padded batch's mask would be ignored (a shared-prompt batch's boolean mask is not needed: the position ids
say the same). The preference loop switches its policy (and a loaded reference) when its layout is `packed` or
`shared_prompt`; a saved config keeps the implementation it was loaded with (transformers does not save it).
"""

from __future__ import annotations

import importlib

import torch

VARLEN = "prefopt_varlen"
BASE_ATTR = "_prefopt_varlen_base"  # on each module (not the config, which is saved): what computes each piece
SUPPORTED = ("sdpa", "eager")


_last: dict = {}  # the plan for the last position ids read: every layer of a forward reads the same tensor


def _pieces(position_ids: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """(prefix start, prefix length, start, end) of each piece of each row. A sequence starts where the position
    ids restart at 0 (a piece with no prefix). A drop to p > 0 inside a sequence starts a branch that continues the
    sequence's first p tokens (the shared-prompt layout's rejected answer after the prompt | chosen piece): its
    piece is those p tokens followed by its own, and only its own tokens' outputs are kept."""
    pieces = []
    for row in position_ids.reshape(-1, position_ids.shape[-1]).tolist():
        cuts, seq, main = [], 0, None  # main: the length of the sequence's first piece, once a branch ends it
        for i, p in enumerate(row):
            if i == 0 or p == 0:
                seq, main = i, None
                cuts.append((i, i, 0))
            elif p != row[i - 1] + 1:
                main = i - seq if main is None else main
                if p > main:
                    raise ValueError(f"position ids jump to {p} at index {i}, past the {main} tokens of the "
                                     f"sequence's first piece that they would continue")
                cuts.append((i, seq, p))
        ends = [c[0] for c in cuts[1:]] + [len(row)]
        pieces.append([(ps, pl, s, e) for (s, ps, pl), e in zip(cuts, ends)])
    return pieces


def _bucket(n: int) -> int:
    """Pieces are batched with others of the same bucket, each right-padded to the bucket's longest: a power of
    two (at least 16), so attention computes at most twice a piece's length and a step makes a few calls."""
    return max(16, 1 << (n - 1).bit_length())


def _plan(position_ids: torch.Tensor, rows: int) -> list[tuple[torch.Tensor, int]]:
    """For each bucket: `gather` (P, L), the flat (row * T + t) index of each piece's tokens (a branch's prefix,
    then its own), right-padded with index 0 (any real token: a padding slot is attended by no real query, causal
    attention looks back only), and the bucket's length L; then `scatter` (rows * T,), where each token's output lies
    in the buckets' outputs laid end to end (a prefix's outputs in a branch piece are computed and not kept). Read
    once per forward (reading position ids moves them to the host: a GPU sync) and reused by every layer; a new
    tensor, or one written in place, is read again."""
    if _last.get("ids") is position_ids and _last["version"] == position_ids._version and _last["rows"] == rows:
        return _last["plan"]
    per_row = _pieces(position_ids)
    if len(per_row) != rows:  # position ids shared by every row
        per_row = per_row[:1] * rows
    T = position_ids.shape[-1]
    buckets: dict[int, list[tuple[int, int, int, int]]] = {}
    for r, pieces in enumerate(per_row):
        for ps, pl, s, e in pieces:
            buckets.setdefault(_bucket(pl + e - s), []).append((r * T + ps, pl, r * T + s, e - s))
    device = position_ids.device
    plan, slot, where = [], 0, torch.empty(rows * T, dtype=torch.long)
    for L, members in sorted(buckets.items()):
        longest = max(pl + n for _, pl, _, n in members)
        gather = torch.zeros((len(members), longest), dtype=torch.long)
        for i, (prefix, pl, flat, n) in enumerate(members):
            gather[i, :pl] = torch.arange(prefix, prefix + pl)
            gather[i, pl:pl + n] = torch.arange(flat, flat + n)
            own = slot + i * longest + pl
            where[flat:flat + n] = torch.arange(own, own + n)
        slot += len(members) * longest
        plan.append((gather.to(device), longest))
    plan.append((where.to(device), 0))  # the scatter, last
    _last.update(ids=position_ids, version=position_ids._version, rows=rows, plan=plan)
    return plan


def _piece_mask(n: int, window: int | None, additive: bool, dtype, device) -> torch.Tensor | None:
    """The causal (and sliding-window: key within the last `window` positions) mask of a piece of n tokens, shared
    by every piece of a bucket (each starts at 0); None when plain causal attention needs none (SDPA's is_causal)."""
    if not additive and (not window or n <= window):
        return None
    i = torch.arange(n, device=device)
    allowed = i[None, :] <= i[:, None]
    if window:
        allowed &= (i[:, None] - i[None, :]) < window
    if not additive:
        return allowed[None, None]
    return torch.zeros((1, 1, n, n), dtype=dtype, device=device).masked_fill_(~allowed[None, None],
                                                                              torch.finfo(dtype).min)


def _family_eager(module):
    """The eager attention function of the module's own modeling file (its soft-capping and scaling), else
    transformers' shared one."""
    fn = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     position_ids: torch.Tensor | None = None, sliding_window: int | None = None, **kwargs):
    """An attention function (transformers' interface: query (B, H, T, D), key and value (B, Hkv, T, D) ->
    (B, T, H, D), None) computing each packed sequence on its own: the pieces of a length bucket batched as rows
    of their own, right-padded to the bucket's longest, one call per bucket."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if position_ids is None:
        raise ValueError(f"attention {VARLEN!r} reads the packed sequences from position_ids; none were passed")
    base = getattr(module, BASE_ATTR, "sdpa")
    eager = base == "eager" or kwargs.get("softcap") is not None  # SDPA cannot soft-cap
    fn = _family_eager(module) if eager else sdpa_attention_forward
    kwargs.pop("is_causal", None)
    B, H, T, D = query.shape
    *buckets, (scatter, _) = _plan(position_ids, B)
    flat = [x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (query, key, value)]  # (B*T, heads, D)
    outs = []
    for gather, L in buckets:
        # index_select: its backward is index_add (advanced indexing's, index_put with accumulate, is slower on CPU)
        q, k, v = (x.index_select(0, gather.reshape(-1)).view(*gather.shape, *x.shape[1:]).transpose(1, 2)
                   for x in flat)  # (P, heads, L, D)
        mask = _piece_mask(L, sliding_window, eager, query.dtype, query.device)
        out, _ = fn(module, q, k, v, mask, sliding_window=sliding_window, **kwargs)  # (P, L, H, D)
        outs.append(out.reshape(-1, H, out.shape[-1]))
    return torch.cat(outs).index_select(0, scatter).reshape(B, T, H, -1), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)


def _configs(model):
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def use_varlen(model) -> str:
    """Switch a loaded model's attention to VARLEN (each piece computed with its current implementation, which
    must be sdpa or eager); returns that implementation, for `restore`. Nothing of it reaches a saved config."""
    register()
    base = _configs(model)[-1]._attn_implementation
    if base not in SUPPORTED:
        raise ValueError(f"varlen attention computes pieces with sdpa or eager attention, not {base!r}")
    for module in model.modules():
        setattr(module, BASE_ATTR, base)
    for config in _configs(model):
        config._attn_implementation = VARLEN
    return base


def restore(model, base: str) -> None:
    """Back to the implementation `use_varlen` replaced (for a padded forward)."""
    for config in _configs(model):
        config._attn_implementation = base
    for module in model.modules():
        if hasattr(module, BASE_ATTR):
            delattr(module, BASE_ATTR)
