"""Batches of preference pairs for a sequence-classifier reward model, and its rewards in one forward pass.

The `reward` stage's classifier (`reward.kind: classifier`) trains in the shared loop on whole texts: prompt +
response + EOS, tokenized as the `score` stage tokenizes them (reward.recipe.classifier_rows), laid out as TRL's
RewardTrainer lays them out: 2B right-padded rows, chosen rows [0, B) then rejected rows [B, 2B).

The reward is the model's own forward: its one-output head at the position transformers' *ForSequenceClassification
reads, the rightmost token that is not `config.pad_token_id` (the tokenizer's pad id, kept in the saved config), the
position the `score` stage reads the saved model at (scoring.scorer.batch_pad_id pads with that id). Only the padded
layout: packed rows would need the head read at each packed sequence's own last token, which the model's pooling
does not do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefopt.training.padding import right_pad


@dataclass
class PairRewards:
    """The classifier's reward of a batch's chosen and rejected texts, (B,) each, float32."""

    chosen: torch.Tensor
    rejected: torch.Tensor


def collate_texts(examples: list[dict], pad_token_id: int) -> dict:
    """{"chosen_ids", "rejected_ids"} examples -> input_ids, attention_mask (2B, T), chosen rows first (TRL's
    DataCollatorForPreference)."""
    rows = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
    input_ids, attention_mask = right_pad(rows, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pair_rewards(model, batch: dict) -> PairRewards:
    """One forward of the 2B rows through the model's own forward (so DDP / FSDP / PEFT hooks run): the head's
    value at each row's last real token."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    chosen, rejected = logits[:, 0].float().chunk(2)  # (2B, 1) -> (B,), (B,)
    return PairRewards(chosen, rejected)
