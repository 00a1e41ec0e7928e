"""Preference pairs for the aligners: read the pairs file, render prompts, tokenize prompt + completion + EOS.

Tokenization matches TRL's DPOTrainer (non-conversational path), so DPO through TRL and SimPO here see the same
tokens: the prompt and prompt + completion are tokenized separately (the tokenizer adds BOS to both) and the
completion starts where the two token lists diverge; EOS is appended to each completion as text; a sequence longer
than `max_length` keeps its start; a pair whose prompt alone fills `max_length` is dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch


def pairs_path(resolved: str) -> str:
    """`stage:pairs` resolves to the pairs stage folder; the rows are in pairs.jsonl inside it."""
    p = Path(resolved)
    return str(p / "pairs.jsonl") if p.is_dir() else str(p)


def load_pairs(path: str, template: str, tokenizer) -> list[dict]:
    """Rows {"prompt", "chosen", "rejected"} as plain text, chat prompts rendered with the tokenizer's template."""
    from prefopt.data.loaders import load_preferences
    from prefopt.data.spec import DatasetSpec
    from prefopt.data.templates import render_prompt

    # pairs built from sampled candidates may hold an empty response (EOS first): a valid, usually rejected, answer;
    # in a user's own file (no stage marker beside it) an empty answer is a broken row
    path = pairs_path(path)
    built_here = (Path(path).parent / "_FINGERPRINT").exists()
    rows = load_preferences(DatasetSpec(path=path, allow_empty_answers=built_here), template).rows
    return [{"prompt": render_prompt(r["prompt"], tokenizer), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in rows]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(row: dict, tokenizer, max_length: int) -> dict | None:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} or None when the prompt alone fills max_length."""
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    full = {}
    for key in ("chosen", "rejected"):
        text = row[key] if row[key].endswith(eos) else row[key] + eos
        full[key] = tokenizer(row["prompt"] + text)["input_ids"]
    n = min(_common_prefix(prompt_ids, full["chosen"]), _common_prefix(prompt_ids, full["rejected"]))
    if max_length and n >= max_length:
        return None
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": full["chosen"][n:], "rejected_ids": full["rejected"][n:]}


def tokenize_pairs(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    out = [tokenize_pair(r, tokenizer, max_length) for r in rows]
    return [t for t in out if t is not None]


def collate_pairs(examples: list[dict], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Chosen sequences then rejected ones, one (2B, T) batch so both go through a single forward pass.

    input_ids, attention_mask, completion_mask: (2B, T), right-padded; rows [0, B) chosen, [B, 2B) rejected."""
    seqs, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids = (ex["prompt_ids"] + ex[key])[:max_length or None]
            mask = ([0] * len(ex["prompt_ids"]) + [1] * len(ex[key]))[:max_length or None]
            seqs.append(ids)
            masks.append(mask)
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        completion_mask[i, : len(m)] = torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
