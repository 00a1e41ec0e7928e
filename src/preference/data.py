"""Preference pairs for the aligners: read the pairs file, render prompts, tokenize prompt + completion + EOS.

Tokenization matches TRL's DPOTrainer (non-conversational path), so prefopt's DPO and SimPO and TRL's trainers see
the same tokens (tests/test_losses.py): the prompt and prompt + completion are tokenized separately (the tokenizer adds BOS to both) and the
completion starts where the two token lists diverge; EOS is appended to each completion as text; a sequence longer
than `max_length` keeps its start. A pair whose prompt alone fills `max_length` (long multi-turn chats) keeps, by
default, its BOS and the last `max_length // 2` prompt tokens, i.e. the latest turns (TRL's `truncation_mode:
keep_end`), or is dropped (`long_prompts: drop`); either way `tokenize_pairs` says how many, loudly, and its
`stats` go into the stage summary, whose `pairs` counts the pairs trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prefopt.data.counts import note
from prefopt.data.templates import encode_many, render_prompt
from prefopt.training.padding import right_pad
from prefopt.training.prefix_tree import common_prefix


def _pairs_file(path: str) -> str:
    """A stage folder -> the pairs.jsonl inside it; a file, a dataset folder or a Hub id as it is."""
    from prefopt.data.sources import is_dataset_folder

    p = Path(path)
    return str(p / "pairs.jsonl") if p.is_dir() and not is_dataset_folder(p) else str(path)


def pairs_path(value, resolve=None):
    """`stage:pairs` resolves to the pairs stage folder; the rows are in pairs.jsonl inside it. `value` is a path
    (`dpo.pairs: stage:pairs`, a file, a dataset folder or a Hub id) or a DatasetSpec (a split, columns, a mixture),
    whose paths are resolved the same way; `resolve` turns `stage:` references into paths."""
    from dataclasses import replace

    from prefopt.data.spec import DatasetSpec

    resolve = resolve or (lambda v: v)
    if not isinstance(value, DatasetSpec):
        return _pairs_file(resolve(value))
    return replace(value, path=_pairs_file(resolve(value.path)) if value.path else "",
                   mixture=[replace(m, path=_pairs_file(resolve(m.path))) for m in value.mixture])


# The loaders' advice for a bad row names `skip_bad_rows`, a dataset-spec key; `dpo.pairs` / `simpo.pairs` given as
# a bare path cannot set it, so their errors give advice the user can follow.
PAIRS_FILE_HINT = ("fix or remove this row: a dpo / simpo `pairs` file is read as it is, bad rows are not "
                   "skipped (the pairs stage writes files that read cleanly)")


def load_pairs(source, template: str, tokenizer) -> list[dict]:
    """Rows {"prompt", "chosen", "rejected"} as plain text, chat prompts rendered with the tokenizer's template.
    `source`: a path (as `pairs_path` gives it) or a DatasetSpec. A bad row is a DataError naming the file or
    dataset, row and field, with `PAIRS_FILE_HINT` as its advice for a bare path."""
    from prefopt.data.loaders import load_preferences
    from prefopt.data.spec import DatasetSpec

    if isinstance(source, DatasetSpec):
        rows = load_preferences(source, template, tokenizer=tokenizer).rows
    else:
        # pairs built from sampled candidates may hold an empty response (EOS first): a valid, usually rejected,
        # answer, and two answers that differ only in whitespace (different tokens the reward model scored apart);
        # in a user's own file (no stage marker beside it) either is a broken row
        path = pairs_path(source)
        built_here = (Path(path).parent / "_FINGERPRINT").exists()
        rows = load_preferences(DatasetSpec(path=path, allow_empty_answers=built_here), template,
                                whitespace_pairs=built_here, bad_row_hint=PAIRS_FILE_HINT, tokenizer=tokenizer).rows
    # one row at a time, replaced as it is converted, so the loader's rows and these are not both held whole
    for i, r in enumerate(rows):
        rows[i] = {"prompt": render_prompt(r["prompt"], tokenizer), "chosen": r["chosen"], "rejected": r["rejected"]}
    return rows


LONG_PROMPTS = ("truncate", "drop")


def keep_prompt_end(prompt_ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last `keep` tokens of a prompt, its BOS (when it starts with one) kept in front of them."""
    if keep <= 0:
        return []
    if bos_id is not None and prompt_ids and prompt_ids[0] == bos_id and keep > 1:
        return prompt_ids[:1] + prompt_ids[len(prompt_ids) - (keep - 1):]
    return prompt_ids[len(prompt_ids) - keep:]


def tokenize_pair(row: dict, tokenizer, max_length: int, long_prompts: str = "truncate") -> dict | None:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} (+ "truncated": True when the prompt was cut), or None when
    the prompt alone fills max_length and long_prompts is "drop"."""
    return tokenized_pairs([row], tokenizer, max_length, long_prompts)[0]


def tokenized_pairs(rows: list[dict], tokenizer, max_length: int, long_prompts: str = "truncate") -> list[dict | None]:
    """`tokenize_pair` of every row, the texts tokenized in one batch (`encode_many`), with no notes or warnings:
    what scorers call on every pass; `tokenize_pairs` is the training data's, and says what it cut."""
    eos = tokenizer.eos_token
    full = [r["prompt"] + (r[key] if r[key].endswith(eos) else r[key] + eos) for key in ("chosen", "rejected")
            for r in rows]
    # one call for prompts and both answers: a scorer's rows repeat texts (chosen == rejected), tokenized once
    ids = encode_many([r["prompt"] for r in rows] + full, tokenizer)  # one BOS, whether a text carries it or not
    n = len(rows)
    return [_split_pair(ids[i], ids[n + i], ids[2 * n + i], tokenizer, max_length, long_prompts) for i in range(n)]


def _split_pair(prompt_ids: list[int], chosen: list[int], rejected: list[int], tokenizer, max_length: int,
                long_prompts: str) -> dict | None:
    n = min(common_prefix(prompt_ids, chosen), common_prefix(prompt_ids, rejected))
    out = {"prompt_ids": prompt_ids[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}
    if max_length and n >= max_length:
        if long_prompts == "drop":
            return None
        # half the budget for the answers: the prompt's latest turns are what the answers reply to
        out["prompt_ids"] = keep_prompt_end(out["prompt_ids"], max_length // 2, tokenizer.bos_token_id)
        out["truncated"] = True
    return out


class TokenizedPairs(list):
    """The tokenized pairs, with `stats`: pairs_in, pairs (kept), prompts_truncated, dropped_long_prompt."""

    stats: dict


def tokenize_pairs(rows: list[dict], tokenizer, max_length: int, long_prompts: str = "truncate") -> TokenizedPairs:
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"long_prompts must be one of {LONG_PROMPTS}, got {long_prompts!r}")
    out = TokenizedPairs(t for t in tokenized_pairs(rows, tokenizer, max_length, long_prompts) if t is not None)
    truncated = sum(1 for t in out if t.pop("truncated", False))
    out.stats = {"pairs_in": len(rows), "pairs": len(out), "prompts_truncated": truncated,
                 "dropped_long_prompt": len(rows) - len(out)}
    note(f"pair prompts cut to their last {max_length // 2} tokens to fit max_length (long_prompts: truncate)",
         truncated)
    note("pairs dropped: the prompt fills max_length (long_prompts: drop)", len(rows) - len(out))
    if truncated or len(out) < len(rows):  # said loudly: 42% of a user's pairs went this way unnoticed once
        what = (f"dropped {len(rows) - len(out)}" if long_prompts == "drop"
                else f"cut {truncated} prompts to their last {max_length // 2} tokens (long_prompts: drop drops them)")
        print(f"[prefopt] WARNING: {truncated + len(rows) - len(out)} of {len(rows)} pairs have a prompt that fills "
              f"max_length={max_length} tokens: {what}; {len(out)} pairs are trained on", flush=True)
    return out


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
    input_ids, attention_mask = right_pad(seqs, pad_token_id)
    completion_mask, _ = right_pad(masks, 0)  # each mask as long as its sequence
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
