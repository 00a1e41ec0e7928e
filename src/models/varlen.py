"""Padding-free attention over packed rows on any device: each packed sequence attends to itself alone, computed one
sequence at a time by the model's own attention function, so no (T x T) mask is built and no position is padding.

Flash attention's varlen kernels do this on a GPU (transformers reads the sequence starts from the position ids);
SDPA and eager attention have no varlen form, and the masked alternative (one boolean (T, T) mask over a packed row,
prefopt.preference.batching's shared-prompt layout) computes every query against every key of the row and throws
most of it away. Here a row is cut where its position ids restart at 0 and each piece goes through the attention
function the model was loaded with:

  sdpa    transformers' `sdpa_attention_forward` with no mask (is_causal: the fast kernels), or with the piece's
          own causal sliding-window mask when the piece is longer than the window
  eager   the family's own `eager_attention_forward` (Gemma-2's logit soft-capping lives there) with the piece's
          additive causal (and sliding-window) mask

A piece computed alone is what a padded row holding only that sequence computes, so the log-probs are the padded
layout's to float rounding on every family the conformance suite builds (tests/test_preference_batching.py,
tests/test_architectures.py).

`use_varlen(model)` switches a loaded model to it (`VARLEN`, registered with transformers' AttentionInterface; the
mask builders then make no mask: the implementation is not one of theirs). A model switched so reads packed rows
only: a padded batch's mask would be ignored. The preference loop switches its policy (and a loaded reference) when
its layout is `packed`; a saved config keeps the implementation it was loaded with (transformers does not save it).
"""

from __future__ import annotations

import importlib

import torch

VARLEN = "prefopt_varlen"
BASE_ATTR = "_prefopt_varlen_base"  # on each module (not the config, which is saved): what computes each piece
SUPPORTED = ("sdpa", "eager")


_last: dict = {}  # the pieces of the last position ids read: every layer of a forward reads the same tensor


def _pieces(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(start, end) of each sequence of each row: a sequence starts where the position ids restart at 0. Read once
    per forward (reading them moves them to the host: a GPU sync), then reused by the other layers."""
    if _last.get("ids") is position_ids and _last["version"] == position_ids._version:  # held: not a reused address
        return _last["pieces"]
    pieces = []
    for row in position_ids.reshape(-1, position_ids.shape[-1]).tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        if starts[0] != 0:
            starts = [0] + starts
        pieces.append(list(zip(starts, starts[1:] + [len(row)])))
    _last.update(ids=position_ids, version=position_ids._version, pieces=pieces)
    return pieces


def _piece_mask(n: int, window: int | None, additive: bool, dtype, device) -> torch.Tensor | None:
    """The causal (and sliding-window: key within the last `window` positions) mask of one piece of n tokens; None
    when plain causal attention needs none (SDPA's is_causal)."""
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
    (B, T, H, D), None) computing each packed sequence of each row on its own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if position_ids is None:
        raise ValueError(f"attention {VARLEN!r} reads the packed sequences from position_ids; none were passed")
    base = getattr(module, BASE_ATTR, "sdpa")
    eager = base == "eager" or kwargs.get("softcap") is not None  # SDPA cannot soft-cap
    fn = _family_eager(module) if eager else sdpa_attention_forward
    kwargs.pop("is_causal", None)
    rows = []
    per_row = _pieces(position_ids)
    if len(per_row) != query.shape[0]:  # position ids shared by every row
        per_row = per_row[:1] * query.shape[0]
    for b, pieces in enumerate(per_row):
        outs = []
        for s, e in pieces:
            mask = _piece_mask(e - s, sliding_window, eager, query.dtype, query.device)
            out, _ = fn(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], mask,
                        sliding_window=sliding_window, **kwargs)
            outs.append(out)
        rows.append(torch.cat(outs, dim=1))
    return torch.cat(rows, dim=0), None


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
