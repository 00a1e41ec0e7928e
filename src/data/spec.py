"""How a stage names a dataset in its config section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefopt.config import check_ranges

Format = Literal[
    "auto",  # decided from the first row's keys
    "alpaca",  # instruction / input / output (SFT) or instruction / input / chosen / rejected (preferences)
    "prompt_completion",  # prompt / completion
    "messages",  # chat messages [{role, content}]
    "sharegpt",  # conversations [{from, value}] (+ chosen/rejected for LLaMA-Factory's preference form)
    "preference",  # prompt / chosen / rejected as strings or message lists
    "hh",  # chosen / rejected full transcripts ("\n\nHuman: ... \n\nAssistant: ..." or message lists), no prompt
    "prompt",  # prompt alone (generation)
]


@dataclass
class DatasetSpec:
    path: str = ""
    """A .json / .jsonl / .json.gz / .jsonl.gz file, or `stage:NAME/FILE` for a file an earlier stage wrote."""
    format: Format = "auto"
    """Row format; `auto` decides from the first row's keys."""
    limit: int = 0
    """Use only the first N usable rows (0: all)."""
    skip_bad_rows: bool = False
    """Skip rows that fail validation (their count is logged and written to the summary) instead of stopping."""
    allow_empty_answers: bool = False
    """Accept an empty chosen/rejected/completion. Off for human data (an empty answer is a broken row); the pairs
    the pipeline builds set it, since a sampled candidate may be empty (the model stopped at once)."""
    dedup: bool = False
    """Drop exact duplicate rows (same prompt and answers, ignoring whitespace); the count is reported."""
    near_dedup: bool = False
    """Drop near-duplicate rows: a row (instruction, input and answers) whose word n-grams overlap an earlier row's
    with Jaccard similarity >= `near_dedup_threshold` (MinHash LSH, datasketch); counted apart from exact
    duplicates."""
    near_dedup_threshold: float = 0.8
    """Jaccard similarity of two rows' n-gram sets at which the later one is a near duplicate."""
    near_dedup_ngram: int = 2
    """Words per shingle: one changed word in an L-word row leaves Jaccard (L-2n+1)/(L+1), so with n = 2 a
    one-word edit reaches 0.8 from 19 words (short rows differing in a word are usually different tasks)."""
    near_dedup_num_perm: int = 128
    """MinHash permutations: more finds pairs near the threshold more surely, at more hashing per row."""
    languages: list[str] = field(default_factory=list)
    """Keep only rows whose prompt is in one of these languages (ISO 639-1 codes, e.g. [en] or [zh]; detected by
    py3langid; a variety counts as its macrolanguage: Wu or Cantonese as zh); the count dropped is reported.
    Empty: every language."""
    field_prefix: str = ""
    """Alpaca fields with a prefix, e.g. `zh_` reads zh_instruction / zh_input / zh_output (alpaca-chinese-dataset).
    Without one, `en_` fields are read where the plain ones are absent."""
    max_chars: int = 1_000_000
    """Refuse (or, with `skip_bad_rows`, skip) a row whose text fields hold more characters than this: a
    multi-megabyte prompt is a broken row, and tokenizing it can take tens of GB of memory."""

    def __post_init__(self):
        check_ranges(self, limit=dict(ge=0), max_chars=dict(ge=1), near_dedup_threshold=dict(gt=0, le=1),
                     near_dedup_ngram=dict(ge=1), near_dedup_num_perm=dict(ge=2))
        if self.languages:
            from prefopt.config import FieldError
            from prefopt.data.clean import check_languages

            try:
                check_languages(self.languages)
            except ValueError as e:
                raise FieldError("languages", str(e)) from None
