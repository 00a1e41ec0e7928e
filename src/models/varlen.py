"""Padding-free attention over packed rows on any device: each packed sequence attends to itself alone, so no
(T x T) mask is built and the linear layers compute no padding.

Flash attention's varlen kernels do this on a GPU (transformers reads the sequence starts from the position ids);
SDPA and eager attention have no varlen form, and the masked alternative (one boolean (T, T) mask over a packed row,
prefopt.preference.batching's shared-prompt layout) computes every query against every key of the row and throws
most of it away. Here a row is cut where its position ids restart at 0; the pieces of a length bucket (powers of
two) are gathered as rows of their own, right-padded to the bucket's longest (causal attention never reads that
padding), and each bucket goes through the attention function the model was loaded with, in one call.

The layouts that share tokens (prefopt.preference.batching's shared prompt collated without masks, and the prefix
tree, prefopt.training.prefix_tree) are one packed row too: a drop of the position ids to p > 0 starts a branch
that continues the first p tokens of the sequence before it (`pieces`: a rejected answer continues its pair's
prompt; a prefix tree's sequence the longest prefix it shares with the one before, which may span several earlier
pieces). A branch's piece computes only its own queries, against its prefix's keys and values (already rotated at
their own positions) followed by its own: query j sits at key position p + j, a lower-right causal mask. The
prefix's tokens are computed once, linear layers and attention rows alike, by the pieces that own them.

  sdpa    transformers' `sdpa_attention_forward` with no mask (is_causal: the fast kernels) for a bucket of pieces
          without a prefix, else with the bucket's boolean causal (and sliding-window) mask
  eager   the family's own `eager_attention_forward` (Gemma-2's logit soft-capping lives there) with the bucket's
          additive causal (and sliding-window) mask

A piece computed alone is what a padded row holding only that sequence computes, so the log-probs are the padded
layout's to float rounding on every family the conformance suite builds (tests/test_preference_batching.py,
tests/test_architectures.py).

`use_varlen(model)` switches a loaded model to it (`VARLEN`, registered with transformers' AttentionInterface; the
mask builders then make no mask: the implementation is not one of theirs). A model switched so reads packed rows
only: a padded batch's mask would be ignored (a shared-prompt batch's boolean mask is not needed: the position ids
say the same). The preference loop switches its policy (and a loaded reference) when its layout is `packed`,
`shared_prompt` or `prefix_tree`; `switched(model)` does it for one call (evaluation's log-probs, PPO's passes,
whose policy also generates); a saved config keeps the implementation it was loaded with (transformers does not
save it).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from prefopt.models.loading import unwrapped

VARLEN = "prefopt_varlen"
BASE_ATTR = "_prefopt_varlen_base"  # on each module (not the config, which is saved): what computes each piece
SUPPORTED = ("sdpa", "eager")


_last: dict = {}  # the plan for the last position ids read: every layer of a forward reads the same tensor


def pieces(position_ids: torch.Tensor) -> list[list[tuple[tuple[int, ...], int, int]]]:
    """(prefix, start, end) of each piece of each row: `prefix` the row indices of the tokens the piece continues.

    A sequence starts where the position ids restart at 0 (a piece with no prefix). A drop to p > 0 starts a
    branch that continues the first p tokens of the sequence before it (the previous piece's prefix and its own
    tokens): its piece is those p tokens followed by its own, and only its own tokens' outputs are kept. One rule
    gives both batch layouts that share tokens: the shared prompt's rejected answer continues the prompt of the
    prompt | chosen piece before it, and the prefix tree's sorted sequences each continue the longest prefix they
    share with the one before (a prefix tree in depth-first order, so a prefix can span several pieces)."""
    pieces = []
    for row in position_ids.reshape(-1, position_ids.shape[-1]).tolist():
        starts = [i for i, p in enumerate(row) if i == 0 or p == 0 or p != row[i - 1] + 1]
        out, path = [], []  # path: the row indices of the previous piece's sequence, prefix then own tokens
        for s, e in zip(starts, starts[1:] + [len(row)]):
            p = row[s] if s else 0
            if p > len(path):
                raise ValueError(f"position ids jump to {p} at index {s}, past the {len(path)} tokens of the "
                                 f"sequence before it that they would continue")
            prefix = tuple(path[:p])
            out.append((prefix, s, e))
            path = [*prefix, *range(s, e)]
        pieces.append(out)
    return pieces


def _bucket(n: int) -> int:
    """Pieces are batched with others of the same bucket, each right-padded to the bucket's longest: a power of
    two (at least 16), so attention computes at most twice a piece's length and a step makes a few calls."""
    return max(16, 1 << (n - 1).bit_length())


@dataclass
class Bucket:
    """Pieces computed in one attention call. `keys` (P, Lk): the flat (row * T + t) index of each piece's keys, its
    prefix's then its own tokens'; `queries` (P, Lq): its own tokens' (the same tensor when no piece has a prefix).
    Both are right-padded with index 0 (any real token: a padding key is seen by no real query, causal attention
    looks back only; a padding query's output is not kept). `offsets` (P,): each piece's prefix length, so its
    query j sits at key position offsets[i] + j (None: no prefix, plain causal attention)."""

    queries: torch.Tensor
    keys: torch.Tensor
    offsets: torch.Tensor | None
    masks: dict = field(default_factory=dict, repr=False)
    """(window, additive, dtype) -> its mask: built by the first layer that asks, read by the others."""


def _plan(position_ids: torch.Tensor, rows: int) -> tuple[list[Bucket], torch.Tensor]:
    """The buckets, and `scatter` (rows * T,): where each token's output lies in the buckets' outputs laid end to
    end. A piece with a prefix computes only its own queries, against its prefix's keys and its own (a branch's
    prefix is computed, queries and all, by the piece that owns those tokens), so it is bucketed by both lengths.
    Read once per forward (reading position ids moves them to the host: a GPU sync) and reused by every layer; a
    new tensor, or one written in place, is read again."""
    if _last.get("ids") is position_ids and _last["version"] == position_ids._version and _last["rows"] == rows:
        return _last["plan"]
    per_row = pieces(position_ids)
    if len(per_row) != rows:  # position ids shared by every row
        per_row = per_row[:1] * rows
    T = position_ids.shape[-1]
    grouped: dict[tuple[int, int], list[tuple[list[int], int, int]]] = {}
    for r, row in enumerate(per_row):
        for prefix, s, e in row:
            n, pl = e - s, len(prefix)
            grouped.setdefault((_bucket(n), _bucket(pl + n) if pl else 0), []).append(
                ([r * T + i for i in prefix], r * T + s, n))
    device = position_ids.device
    # index lists built in Python and made tensors once per bucket (a tensor op per piece cost ~1 ms a step)
    buckets, slot, where = [], 0, [0] * (rows * T)
    for _, members in sorted(grouped.items()):
        lq = max(n for _, _, n in members)
        lk = max(len(prefix) + n for prefix, _, n in members)
        queries, keys = [], []
        for i, (prefix, flat, n) in enumerate(members):
            own = list(range(flat, flat + n))
            queries.append(own + [0] * (lq - n))
            keys.append(prefix + own + [0] * (lk - len(prefix) - n))
            where[flat:flat + n] = range(slot + i * lq, slot + i * lq + n)
        slot += len(members) * lq
        offsets = [len(prefix) for prefix, _, _ in members]
        q = torch.tensor(queries, dtype=torch.long, device=device)
        if any(offsets):
            buckets.append(Bucket(q, torch.tensor(keys, dtype=torch.long, device=device),
                                  torch.tensor(offsets, dtype=torch.long, device=device)))
        else:
            buckets.append(Bucket(q, q, None))
    plan = (buckets, torch.tensor(where, dtype=torch.long, device=device))
    _last.update(ids=position_ids, version=position_ids._version, rows=rows, plan=plan)
    return plan


def _piece_mask(bucket: Bucket, window: int | None, additive: bool, dtype) -> torch.Tensor | None:
    """The bucket's causal (and sliding-window: key within the last `window` positions) mask, (P | 1, 1, Lq, Lk):
    query j of piece i sees key k <= offsets[i] + j. None when plain causal attention needs none (SDPA's is_causal:
    no prefix, and no window that the bucket's length reaches)."""
    lq, lk = bucket.queries.shape[1], bucket.keys.shape[1]
    device = bucket.keys.device
    if bucket.offsets is None and not additive and (not window or lk <= window):
        return None
    offsets = bucket.offsets if bucket.offsets is not None else torch.zeros(1, dtype=torch.long, device=device)
    # (P, Lq, 1): the key position of each query
    at = offsets[:, None, None] + torch.arange(lq, device=device)[None, :, None]
    k = torch.arange(lk, device=device)[None, None, :]
    allowed = k <= at
    if window:
        allowed &= (at - k) < window
    allowed = allowed[:, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


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
    buckets, scatter = _plan(position_ids, B)
    flat = [x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (query, key, value)]  # (B*T, heads, D)
    outs = []
    for bucket in buckets:
        # index_select: its backward is index_add (advanced indexing's, index_put with accumulate, is slower on CPU)
        q, k, v = (x.index_select(0, at.reshape(-1)).view(*at.shape, *x.shape[1:]).transpose(1, 2)
                   for x, at in zip(flat, (bucket.queries, bucket.keys, bucket.keys)))  # (P, heads, L, D)
        key = (sliding_window, eager, query.dtype)
        if key not in bucket.masks:
            bucket.masks[key] = _piece_mask(bucket, sliding_window, eager, query.dtype)
        mask = bucket.masks[key]
        out, _ = fn(module, q, k, v, mask, sliding_window=sliding_window, **kwargs)  # (P, Lq, H, D)
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


@contextmanager
def switched(model):
    """For the duration, the model (under any DDP / DeepSpeed wrapper) reads packed and prefix-tree rows: yields
    True when it does (already switched, or SDPA / eager switched now and restored after, so a model that also
    generates, as PPO's policy does, is back to its own attention for that), False when its attention cannot (flash
    attention cannot read a shared prefix; a module that is no transformers model: pass padded rows)."""
    inner = unwrapped(model)
    base = _implementation(inner)
    if base not in SUPPORTED:  # already varlen (True), or it cannot be (False)
        yield base == VARLEN
        return
    use_varlen(inner)
    try:
        yield True
    finally:
        restore(inner, base)


def reads_pieces(model) -> bool:
    """Whether `switched(model)` makes the model read packed and prefix-tree rows (SDPA, eager, or already varlen)."""
    base = _implementation(unwrapped(model))
    return base == VARLEN or base in SUPPORTED


def _implementation(model) -> str | None:
    """The attention implementation a model's (text) config names; None for a module that is no transformers
    model (a test's stand-in, a function): it is given padded rows."""
    if getattr(model, "config", None) is None:
        return None
    return _configs(model)[-1]._attn_implementation
