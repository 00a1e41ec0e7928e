"""The forward of a collated batch (prefopt.preference.batching's layouts: padded, packed, shared_prompt): every
sequence's summed completion log-prob in one pass, `pair_logps`, the one sequence log-prob function that the
preference loop (DPO, SimPO, SFT, the likelihood reward model), evaluation and the reference pass all call
(through `prefopt.training.logps.response_logps` for lists of prompts and responses).

The forward takes the last hidden states at the positions that predict a completion token only, and projects them
to the vocabulary in chunks of `chunk_size` tokens, each chunk recomputed in backward, so the (tokens x vocab)
float32 logits never exist at once (the large-vocabulary memory problem, TRL #7244).

Two things make that true beyond one architecture:
  masks        `collate` writes which key each query may see as a boolean (R, 1, T, T), or nothing when the
               position ids say it (`allowed_from_positions`: a restart at 0 begins a sequence, a drop to P > 0 a
               branch that continues its first P tokens). transformers passes a 4D mask to the attention function
               unchanged, and eager attention *adds* it to the scores, so a boolean would mask nothing (True adds
               1). `attention_inputs` turns it into what the model's attention implementation applies: a boolean
               for SDPA, an additive float (0 / dtype min) for eager, one mask per layer type (Gemma-2/3, Qwen2)
               with the sliding window measured in position ids, so a layer that sees only the last W positions
               sees them in every layout. Varlen attention (prefopt.models.varlen) reads every layout from the
               position ids and takes no mask; flash attention takes the packed layout from the position ids alone
               and refuses the shared prompt (it cannot read a branch).
  projection   `project_logits` applies what the model's own forward applies after lm_head (Gemma-2's final
               logit soft-capping, Cohere's logit scale, Granite's logit divisor), so the chunked path optimises
               the same objective as the model's forward.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from prefopt.models.loading import unwrapped
from prefopt.models.varlen import VARLEN, pieces


class LayoutError(ValueError):
    """A layout the model's attention implementation cannot take (the caller names the config key). The CLI reports
    it as a config error (exit 2) from its `kind` and `exit_code`, so this library imports no config code."""

    kind, exit_code = "config error", 2


# attention implementations whose 4D masks this module writes, and the flash kernels that read packing from
# position ids (transformers' packed-sequence detection) but take no mask
_MASKED_IMPLS = ("eager", "sdpa")
_FLASH_PREFIXES = ("flash_attention", "kernels-community/flash", "kernels-community/vllm-flash")


def attention_implementation(model) -> str:
    config = unwrapped(model).config
    return str(getattr(config.get_text_config(), "_attn_implementation", None) or "eager")


def check_layout(model, layout: str, key: str = "layout") -> None:
    """Refuse, naming `key` and the implementation, a layout the model's attention cannot compute exactly."""
    if layout == "padded":
        return
    impl = attention_implementation(model)
    flash = impl.startswith(_FLASH_PREFIXES)  # sequences from position ids, no mask, no branch
    if impl in _MASKED_IMPLS or impl == VARLEN or (flash and layout == "packed"):
        types = set(getattr(unwrapped(model).config.get_text_config(), "layer_types", None) or ())
        unknown = types - {"full_attention", "sliding_attention"}
        if unknown:
            raise LayoutError(f"{key}={layout} is not supported for layer types {sorted(unknown)} "
                              f"(only full and sliding attention); use {key}=padded")
        return
    if flash:  # it reads packed sequences from the position ids, not a branch back into a shared prefix
        raise LayoutError(f"{key}={layout} cannot run with attn_implementation={impl!r}: it cannot express a shared "
                          f"prefix (a branch); use {key}=packed (padding-free under flash attention) or padded")
    raise LayoutError(f"{key}={layout} cannot run with attn_implementation={impl!r}: prefopt writes no masks for it; "
                      f"use {key}=padded or attn_implementation eager/sdpa")


def _layer_windows(config) -> dict[str | None, int | None]:
    """The masks the model's forward takes: {layer type: sliding window or None}. Models whose config lists
    `layer_types` (Gemma-2/3, Qwen2/3) take a dict keyed by layer type; the others one mask for every layer, with
    the sliding window when the config has one (Mistral, Phi-3) and none otherwise (Llama)."""
    types = getattr(config, "layer_types", None)
    if types:
        windows = dict(zip(types, layer_windows(config)))
        return {t: windows[t] for t in sorted(windows)}
    return {None: getattr(config, "sliding_window", None)}


def layer_windows(config) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: the whole prefix), by `_layer_windows`' rule: a `sliding_attention` layer
    of `layer_types` has the config's `sliding_window`, the others none; without `layer_types` every layer has it."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    return tuple(window if t in (None, "sliding_attention") else None for t in types)


def reads_position_ids(model) -> bool:
    """Whether the model's attention reads packed sequences from the position ids alone (flash attention's varlen
    kernels, prefopt.models.varlen), so a collated batch needs no mask: `collate(..., masks=False)`."""
    impl = attention_implementation(model)
    return impl.startswith(_FLASH_PREFIXES) or impl == VARLEN


def _branches(pos: torch.Tensor) -> torch.Tensor:
    """(R, T) bool: where the position ids drop to p > 0, the start of a branch that continues its sequence's first
    p tokens (the shared prompt's rejected answer)."""
    out = torch.zeros_like(pos, dtype=torch.bool)
    out[..., 1:] = (pos[..., 1:] != pos[..., :-1] + 1) & (pos[..., 1:] != 0)
    return out


def allowed_from_positions(pos: torch.Tensor) -> torch.Tensor:
    """(R, 1, T, T) bool of allowed (query, key) pairs from position ids alone, by the rule varlen attention reads
    them with (`prefopt.models.varlen.pieces`): a sequence starts where they restart at 0 and attends causally to
    itself; a branch (a drop to p > 0) attends causally to itself and to the first p tokens of the sequence before
    it. What `collate` writes as the shared prompt's mask, for a batch collated without."""
    R, T = pos.shape
    allowed = torch.zeros((R, 1, T, T), dtype=torch.bool)
    causal = torch.ones((T, T), dtype=torch.bool).tril()
    for r, row in enumerate(pieces(pos.cpu())):
        for prefix, s, e in row:
            allowed[r, 0, s:e, s:e] = causal[:e - s, :e - s]
            if prefix:
                allowed[r, 0, s:e, list(prefix)] = True
    return allowed.to(pos.device)


def attention_inputs(model, batch: dict) -> dict:
    """attention_mask (and position_ids) for the model's forward, as its attention implementation applies them.

    Padded batches carry a 2D mask the model turns into its own causal (and sliding) masks. Packed batches carry a
    boolean (R, 1, T, T) of allowed (query, key) pairs, or none (then it is built from the position ids); here each
    layer type gets it with the sliding window (pos[q] - pos[k] < W, the model's own `kv_idx > q_idx - W` measured
    in positions, so a rejected completion whose positions continue from the prompt sees the prompt tokens it would
    see when padded), as a boolean for SDPA or an additive float for eager attention (which adds the mask to the
    scores). Varlen attention reads everything from the position ids; flash attention cannot read a branch."""
    if "position_ids" not in batch:
        return {"attention_mask": batch["attention_mask"]}
    impl = attention_implementation(model)
    pos = batch["position_ids"]
    if impl == VARLEN:  # every layout's structure is in the position ids (a shared prompt's mask is redundant)
        return {"attention_mask": None, "position_ids": pos}
    if impl.startswith(_FLASH_PREFIXES):  # packed: the sequences are read from the position ids
        if "attention_mask" in batch or bool(_branches(pos).any()):
            raise LayoutError(f"a batch with a shared prefix (shared_prompt, prefix_tree) cannot run with "
                              f"attn_implementation={impl!r}: it cannot express a branch back into a prefix")
        return {"attention_mask": None, "position_ids": pos}
    if impl not in _MASKED_IMPLS:
        raise LayoutError(f"layout with packed sequences cannot run with attn_implementation={impl!r}")
    config = unwrapped(model).config.get_text_config()
    allowed = batch.get("attention_mask")
    if allowed is None:  # packed (or a shared prompt collated without masks): from the position ids
        allowed = allowed_from_positions(pos)
    dtype = unwrapped(model).dtype
    masks = {}
    for layer_type, window in _layer_windows(config).items():
        m = allowed
        if window:
            m = m & ((pos[:, None, :, None] - pos[:, None, None, :]) < window)
        if impl == "eager":  # added to the scores: 0 where allowed, the dtype's minimum elsewhere
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)
        masks[layer_type] = m
    return {"attention_mask": masks[None] if None in masks else masks, "position_ids": pos}


def project_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head(hidden) and whatever the model's own forward applies to the logits after it: Gemma-2's final logit
    soft-capping (cap * tanh(logits / cap)), Cohere's `logit_scale` (multiply), Granite's `logits_scaling`
    (divide). The chunked projection must optimise the objective the model's forward defines."""
    inner = unwrapped(model)
    logits = inner.get_output_embeddings()(hidden)
    config = inner.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and divisor != 1:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _is_fsdp(model) -> bool:
    """Sharded by FSDP (version 2 swaps the model's class; version 1 wraps it)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(model, (FSDPModule, FullyShardedDataParallel))


def sequence_sums(logps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Target-token log-probs (N,) -> (summed log-prob, completion length) per sequence, (num_sequences,) each:
    token j counts for sequence `seq_index[j]`."""
    n = int(batch["num_sequences"])
    sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, batch["seq_index"], logps)
    lengths = torch.bincount(batch["seq_index"], minlength=n).to(logps.dtype)
    return sums, lengths


def _pair_logps_inside_forward(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """pair_logps for a sharded model: FSDP gathers a module's weights only inside its forward, so lm_head cannot
    be applied afterwards to captured hidden states. The model projects the positions that predict a completion
    token itself (`logits_to_keep`: the union of those positions over the rows, (R, K, V) logits), and the targets
    are read from them. Same values as the hook path; more memory (every row at every kept position)."""
    ids = batch["input_ids"]
    T = ids.shape[1]
    source = batch["source_index"]
    positions = torch.unique(source % T)  # sorted
    kwargs = {**attention_inputs(model, batch), "use_cache": False, "logits_to_keep": positions}
    logits = model(input_ids=ids, **kwargs).logits  # (R, K, V)
    logits = logits[source // T, torch.searchsorted(positions, source % T)].float() / temperature  # (N, V)
    targets = batch["target_ids"]
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return sequence_sums(logps, batch)


def _target_logps(hidden: torch.Tensor, model, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target | hidden) per token: (N, d), (N,) -> (N,), the softmax in float32 over logits / temperature."""
    logits = project_logits(model, hidden).float() / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def pair_logps(model, batch: dict, chunk_size: int = 0, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob and completion length of every sequence: (2B,), (2B,), chosen first.

    The model is called through its own forward (so DDP / DeepSpeed / PEFT hooks run) with `logits_to_keep` an
    empty 1D index tensor: it projects no position to the vocabulary (a 1D tensor of positions means the same in
    transformers 5.17 and 5.23; a 2D boolean mask is 5.2x-only); a hook takes the decoder's last hidden states and
    only the positions that predict completion tokens are projected here (chunk_size > 0: in chunks, each
    recomputed in backward). `temperature` divides the logits the model's forward ends with (after any
    soft-capping): the log-probs of the distribution responses sampled at that temperature came from."""
    if _is_fsdp(model):
        return _pair_logps_inside_forward(model, batch, temperature)
    inner = unwrapped(model)
    decoder = inner.get_decoder()
    captured = {}

    def grab(_module, _args, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = decoder.register_forward_hook(grab)
    try:
        ids = batch["input_ids"]
        kwargs = {**attention_inputs(model, batch), "use_cache": False,
                  "logits_to_keep": torch.zeros(0, dtype=torch.long, device=ids.device)}
        model(input_ids=ids, **kwargs)
    finally:
        handle.remove()
    hidden = captured["h"].flatten(0, 1)[batch["source_index"]]  # (N, d): only positions that predict a target
    targets = batch["target_ids"]
    if chunk_size and hidden.shape[0] > chunk_size:
        parts = [checkpoint(_target_logps, hidden[i:i + chunk_size], inner, targets[i:i + chunk_size], temperature,
                            use_reentrant=False) for i in range(0, hidden.shape[0], chunk_size)]
        logps = torch.cat(parts)
    else:
        logps = _target_logps(hidden, inner, targets, temperature)
    return sequence_sums(logps, batch)
