"""Batches of preference pairs (and SFT sequences) in four layouts of the same tokens; their forward is
prefopt.training.forward.

The layouts (prefopt.preference.data: prompt + completion + EOS, TRL's token ids):

  padded         2B right-padded rows, chosen rows [0, B) then rejected rows [B, 2B) (what TRL's DPOTrainer does)
  packed         padding-free: the 2B sequences side by side in one row, position ids restarting at 0 for each;
                 the loop computes each sequence's attention on its own (prefopt.models.varlen on SDPA and eager,
                 flash attention's varlen kernels on a GPU), so nothing is padding and no (T, T) mask is built; a
                 model not switched to varlen gets the block-diagonal causal mask built from the position ids
  shared_prompt  each pair is one segment prompt | chosen | rejected: the prompt is computed once, the chosen and
                 the rejected tokens both attend to it (and to their own earlier tokens) but not to each other; the
                 rejected completion's position ids continue from the prompt as the chosen's do (Wang et al. 2024,
                 "Accelerating Direct Preference Optimization with Prefix Sharing"). With `masks` (attention that
                 reads a mask: SDPA, eager), the segments are packed first-fit into as few rows as fit the longest,
                 with a (R, 1, T, T) boolean mask; without (a model switched to prefopt.models.varlen, as the loop
                 does), they lie in one row with no padding and no mask: the position ids say it all (a restart at
                 0 begins a pair, a drop to P > 0 its rejected answer, which continues the first P tokens)
  prefix_tree    every sequence of the batch (chosen and rejected answers, or SFT examples) in one row, sorted, each
                 computing only what follows the longest prefix it shares with the one before: a prompt shared by a
                 pair, a template or system prompt shared by every example, a question asked twice are each
                 computed once (the batch's prefix tree, depth first). The position ids say it (a drop to p
                 continues the first p tokens of the sequence before); no mask. Where the prompts share nothing
                 but the pair's, it computes what shared_prompt does

Every layout carries, for each completion token, the flat index of the position whose logits predict it
(`source_index`), the token (`target_ids`) and the sequence it belongs to (`seq_index`: pair i's chosen is i, its
rejected B + i). Every layout gives the padded path's
log-probs and gradients to float rounding (tests/test_preference_batching.py), on every architecture the
conformance suite builds (tests/test_architectures.py: Llama-3, Gemma-2, Qwen2.5, Mistral, Phi-3, Gemma-3).

The forward that reads these batches (masks per attention implementation, the chunked projection, `pair_logps`)
is prefopt.training.forward.
"""

from __future__ import annotations

import torch

from prefopt.training.prefix_tree import lay_down

LAYOUTS = ("padded", "packed", "shared_prompt", "prefix_tree")


COMPLETION_KEYS = (("chosen_ids", "rejected_ids"), ("completion_ids",))  # a pair, or one sequence (SFT)


def _truncate(ex: dict, max_length: int) -> tuple[list[int], list[list[int]]]:
    """prompt ids and the completions' ids (chosen and rejected of a pair, or an SFT example's one completion), each
    prompt + completion cut to max_length (keep the start, as TRL)."""
    p = ex["prompt_ids"]
    room = max(max_length - len(p), 0) if max_length else None
    keys = COMPLETION_KEYS[0] if "chosen_ids" in ex else COMPLETION_KEYS[1]
    return p, [ex[k][:room] for k in keys]


def num_targets(ex: dict, max_length: int) -> int:
    """Completion tokens of an example that a batch trains on (after truncation): the tokens an SFT loss averages."""
    return sum(len(c) for c in _truncate(ex, max_length)[1])


def _segments(examples: list[dict], shared: bool, max_length: int) -> list[dict]:
    """One segment per sequence (or per pair when shared): tokens, positions, attention groups, completion targets.

    group[t]: 0 for prompt tokens, 1 chosen, 2 rejected; token t may attend token s <= t of its segment when
    group[s] == 0 or group[s] == group[t]. targets: (position in segment of the predicting token, token, sequence).
    Sequence k of example i is numbered k * B + i: a pair's chosen i, its rejected B + i; an SFT example's i."""
    B = len(examples)
    segs = []
    for i, ex in enumerate(examples):
        p, comps = _truncate(ex, max_length)
        P = len(p)
        if shared:
            c, r = comps
            ids = p + c + r
            pos = list(range(P + len(c))) + list(range(P, P + len(r)))
            group = [0] * P + [1] * len(c) + [2] * len(r)
            targets = [(P + k - 1, c[k], i) for k in range(len(c))]
            targets += [(P - 1 if k == 0 else P + len(c) + k - 1, r[k], B + i) for k in range(len(r))]
            segs.append({"ids": ids, "pos": pos, "group": group, "targets": targets})
        else:
            for seq, comp in ((k * B + i, comp) for k, comp in enumerate(comps)):
                ids = p + comp
                segs.append({"ids": ids, "pos": list(range(len(ids))), "group": [0] * len(ids),
                             "targets": [(P + k - 1, comp[k], seq) for k in range(len(comp))]})
    return segs


def _pack(lengths: list[int]) -> list[list[int]]:
    """First-fit decreasing into rows of the longest segment's length: segment indices per row."""
    cap = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for j in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r in range(len(rows)):
            if room[r] >= lengths[j]:
                rows[r].append(j)
                room[r] -= lengths[j]
                break
        else:
            rows.append([j])
            room.append(cap - lengths[j])
    return rows


def collate(examples: list[dict], pad_token_id: int, max_length: int, layout: str = "padded",
            masks: bool = True) -> dict:
    """Tensors for `pair_logps`. Padded: input_ids, attention_mask (2B, T). Packed: input_ids, position_ids (1, T).
    Shared prompt: input_ids, position_ids (R, T), attention_mask (R, 1, T, T) bool; with masks=False one row
    (1, T) and no mask (for varlen attention: `prefopt.training.forward.reads_position_ids`). Prefix tree: one row
    (1, T) and no mask, always (a model that reads masks gets them from the position ids). All: source_index,
    target_ids, seq_index (N,) and num_sequences (2B; B for SFT examples, which hold one `completion_ids`),
    num_tokens (the non-padding positions); ref_logps (B, 2) when the examples carry precomputed reference log-probs."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    B = len(examples)
    sequences = None  # the prefix tree's, counted below
    if layout == "padded":
        segs = _segments(examples, False, max_length)
        K = len(segs) // max(B, 1)  # sequences per example: 2 (a pair) or 1 (SFT)
        order = [i * K + k for k in range(K) for i in range(B)]  # chosen rows, then rejected
        rows = [[j] for j in order]
    elif layout == "packed":  # one row: nothing is padding (attention runs per sequence, models.varlen)
        segs = _segments(examples, False, max_length)
        rows = [list(range(len(segs)))]
    elif layout == "prefix_tree":  # one row, each shared prefix once; its targets carry their row positions
        sequences = _segments(examples, False, max_length)
        segs, rows = [lay_down([(s["ids"], s["targets"]) for s in sequences])], [[0]]
    else:
        segs = _segments(examples, True, max_length)
        rows = _pack([len(s["ids"]) for s in segs]) if masks else [list(range(len(segs)))]
    T = max(sum(len(segs[j]["ids"]) for j in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    source, target, seq = [], [], []
    attention_mask = None  # packed: none (each sequence is found from its position ids)
    if layout == "padded":
        attention_mask = torch.zeros((R, T), dtype=torch.long)
    elif layout == "shared_prompt" and masks:
        attention_mask = torch.zeros((R, 1, T, T), dtype=torch.bool)
        attention_mask[:, 0] = torch.eye(T, dtype=torch.bool)  # padding attends to itself: no all-masked row (NaN)
    for r, row in enumerate(rows):
        start = 0
        for j in row:
            s = segs[j]
            n = len(s["ids"])
            input_ids[r, start:start + n] = torch.tensor(s["ids"])
            position_ids[r, start:start + n] = torch.tensor(s["pos"])
            if layout == "padded":
                attention_mask[r, :n] = 1
            elif attention_mask is not None:
                g = torch.tensor(s["group"])
                allowed = (g[None, :] == 0) | (g[None, :] == g[:, None])  # (query, key)
                attention_mask[r, 0, start:start + n, start:start + n] = torch.tril(allowed)
            for src, tok, sq in s["targets"]:
                source.append(r * T + start + src)
                target.append(tok)
                seq.append(sq)
            start += n
    out = {"input_ids": input_ids, "source_index": torch.tensor(source),
           "target_ids": torch.tensor(target), "seq_index": torch.tensor(seq),
           "num_sequences": torch.tensor(2 * B if layout == "shared_prompt" else
                                         len(sequences if sequences is not None else segs)),
           "num_tokens": torch.tensor(sum(len(s["ids"]) for s in segs))}  # non-padding positions (throughput)
    if attention_mask is not None:
        out["attention_mask"] = attention_mask
    if layout != "padded":
        out["position_ids"] = position_ids
    if examples and "ref_logps" in examples[0]:
        out["ref_logps"] = torch.tensor([ex["ref_logps"] for ex in examples], dtype=torch.float32)
    return out
