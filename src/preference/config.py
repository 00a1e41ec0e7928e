"""Fields every paired-preference stage shares (the `dpo` and `simpo` sections), on top of TrainFields."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from prefopt.config import check_ranges
from prefopt.data.spec import DatasetSpec
from prefopt.training.fields import LoraSpec, TrainFields


@dataclass
class PreferenceFields(TrainFields):
    model: str = "stage:sft"
    """The policy to align (and, for DPO, the reference unless `ref_model` is set)."""
    pairs: str | DatasetSpec = "stage:pairs"
    """Preference pairs: `stage:pairs`, a preference file or dataset folder, a Hub id (split `train`), or a dataset
    mapping for a split, columns or a mixture ({path: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs})."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """How prompts are rendered: the Alpaca template, or the tokenizer's chat template."""
    layout: Literal["padded", "packed", "shared_prompt", "prefix_tree"] = "prefix_tree"
    """Token layout of a batch: padded (as TRL), packed (padding-free, attention kept inside each sequence),
    shared_prompt (packed, each pair's prompt computed once for chosen and rejected), or prefix_tree (every chosen
    and rejected sequence of the batch sorted in one row, each computed from the end of the longest prefix it
    shares with the one before: a pair's prompt, a template or system prompt every pair shares, a common start of
    the two answers, each computed once). All give the same loss and gradients (float rounding); prefix_tree
    computes the fewest tokens (prefopt.preference.batching). On SDPA and eager the packed layouts are one row with
    no padding and no mask (prefopt.models.varlen); flash attention takes `packed` only."""
    logps_chunk_size: int = 512
    """Project hidden states to the vocabulary this many tokens at a time, recomputed in backward, so the full
    (tokens x vocab) float32 logits never exist at once (TRL #7244; exact: the same log-probs and gradients).
    On by default: it costs one more lm_head pass in backward and keeps peak memory at or below TRL's (the CPU
    benchmark in docs/performance.md). 0: in one piece."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    long_prompts: Literal["truncate", "drop"] = "truncate"
    """A pair whose prompt alone fills `max_length` (long multi-turn chats): `truncate` keeps the prompt's BOS and
    its last max_length // 2 tokens (the latest turns; TRL's truncation_mode keep_end), `drop` leaves the pair out.
    Either way the count is printed and written to the summary."""
    save_total_limit: int = 0
    """Keep at most this many `checkpoints/checkpoint-<step>` folders (0: keep all, so every saved policy can be
    evaluated). Optimizer state is kept only in the newest one (what a resume needs)."""

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self, logps_chunk_size=dict(ge=0))


def loop_fields(section: TrainFields, **loop) -> PreferenceFields:
    """The loop's section for a stage that is not a pair stage (the `reward` stage): its training fields, its model,
    template and LoRA, and the loop's own fields given in `loop` (layout, logps_chunk_size, long_prompts,
    save_total_limit); a typed section the loop reads as it reads `dpo`'s, checked as one."""
    copied = {f.name: getattr(section, f.name) for f in fields(TrainFields)}
    copied.update({k: getattr(section, k) for k in ("model", "template", "lora") if hasattr(section, k)})
    return PreferenceFields(**{**copied, "pairs": "", **loop})
