"""How a stage names a dataset in its config section: a local file, a `datasets` dataset or a mixture of them.

    prompts: {path: data/prompts.jsonl}
    prompts: {path: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs, columns: {instruction: prompt}}
    dataset:
      mixture:                       # alignment-handbook's dataset_mixture: each part's weight is a fraction
        - {path: HuggingFaceH4/ultrafeedback_binarized, split: train_prefs, weight: 0.5}
        - {path: data/own_pairs.parquet}

Where `path` points is decided when the stage reads it (prefopt.data.sources): a Hub id is checked for its form only
before that, so `prefopt check` downloads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefopt.config import FieldError, check_range, check_ranges

Format = Literal[
    "auto",  # decided from the first row's keys
    "alpaca",  # instruction / input / output (SFT) or instruction / input / chosen / rejected (preferences)
    "prompt_completion",  # prompt / completion
    "messages",  # chat messages [{role, content}]
    "sharegpt",  # conversations [{from, value}] (+ chosen/rejected for LLaMA-Factory's preference form)
    "preference",  # prompt / chosen / rejected as strings or message lists
    "hh",  # chosen / rejected full transcripts ("\n\nHuman: ... \n\nAssistant: ..." or message lists), no prompt
    "prompt",  # prompt alone (generation)
    "text",  # text alone: language-model data, every token trained on (continued pretraining through `sft`)
]


# The fields the row formats read: what `columns` may map a dataset's own columns to.
FIELDS = ("prompt", "completion", "chosen", "rejected", "instruction", "input", "output", "messages",
          "conversations", "system", "prompt_id", "id", "instances", "text")
# Files read by prefopt's own JSON reader (row-exact errors); `split`, `name` and `revision` mean nothing there.
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def is_json_file(path: str) -> bool:
    return path.lower().endswith(JSON_SUFFIXES)


def check_source(obj, prefix: str = "") -> None:
    """The checks a dataset's `path`, `split`, `name`, `revision` and `columns` get when the config is read."""
    if obj.columns and not isinstance(obj.columns, (dict, list)):
        raise FieldError(f"{prefix}columns", f"expected a mapping or a list, got {obj.columns!r}")
    if isinstance(obj.columns, dict):
        unknown = sorted(k for k in obj.columns if k not in FIELDS)
        if unknown:
            raise FieldError(f"{prefix}columns", f"maps to {unknown}, which no row format reads; map a column to "
                             f"one of {', '.join(FIELDS)} (columns: {{prompt: question}})")
        bad = [k for k, v in obj.columns.items() if not isinstance(v, str) or not v]
        if bad:
            raise FieldError(f"{prefix}columns", f"{bad[0]!r} must name a column (a string), got {obj.columns[bad[0]]!r}")
    if obj.path and is_json_file(obj.path):
        for key in ("split", "name", "revision"):
            if getattr(obj, key):
                raise FieldError(f"{prefix}{key}", f"{obj.path!r} is a JSON file, which has no {key}; `{key}` is for "
                                 "Hub ids, dataset folders and parquet/Arrow/CSV files")


@dataclass
class MixturePart:
    """One dataset of a mixture: where its rows are, as in DatasetSpec, and what fraction of them to take."""

    path: str = ""
    """As DatasetSpec.path: a file, a dataset folder, a Hub id or `stage:NAME/FILE`."""
    split: str = ""
    """As DatasetSpec.split (empty: `train`)."""
    name: str = ""
    """As DatasetSpec.name: the Hub dataset's config."""
    revision: str = ""
    """As DatasetSpec.revision."""
    columns: dict[str, str] | list[str] = field(default_factory=dict)
    """As DatasetSpec.columns."""
    format: Format = "auto"
    """This part's row format (parts may differ: an HH set beside a prompt/chosen/rejected one)."""
    field_prefix: str = ""
    """As DatasetSpec.field_prefix."""
    weight: float = 1.0
    """Fraction of this part's rows taken, as alignment-handbook's dataset_mixture: 1 all, 0.25 a random quarter
    (seeded by the mixture's `seed`); int(rows x weight) rows."""

    def __post_init__(self):
        if not self.path:
            raise FieldError("path", "is required: the file, folder or Hub id this part reads")
        check_range(self, "weight", ge=0, le=1)
        check_source(self)


@dataclass
class DatasetSpec:
    path: str = ""
    """Where the rows are: a .json / .jsonl / .json.gz / .jsonl.gz file; a .parquet, .arrow, .csv or .tsv file; a
    folder written by `save_to_disk` or laid out as a Hub dataset repo (data/train-*.parquet); a Hub dataset id
    (`HuggingFaceH4/ultrafeedback_binarized`, read from the HF cache when offline); or `stage:NAME/FILE` for a file
    an earlier stage wrote. Everything but JSON is read through `datasets`, memory-mapped."""
    split: str = ""
    """The split of a Hub id, dataset folder or parquet/Arrow/CSV file (empty: `train`); slices as `datasets`
    writes them (`train_prefs[:1000]`) work too."""
    name: str = ""
    """The config of a Hub dataset that has several (`load_dataset(path, name)`)."""
    revision: str = ""
    """Branch, tag or commit of a Hub dataset (empty: main); pin it for a run others can repeat."""
    columns: dict[str, str] | list[str] = field(default_factory=dict)
    """Read only these columns: {field: column} renames a dataset's own columns to the fields the formats read
    ({instruction: question, chosen: good, rejected: bad}); a list keeps the columns named as they are. Empty: all
    columns, as named."""
    mixture: list[MixturePart] = field(default_factory=list)
    """Several datasets in one, instead of `path`, as alignment-handbook's dataset_mixture: each part takes
    `weight` (a fraction) of its rows, then the parts are concatenated and shuffled with `seed`. The options below
    (dedup, languages, limit, ...) apply to the whole; each part's row count is printed and written to the stage
    summary's `counts`."""
    seed: int = 0
    """Seed of a mixture's draws and shuffle (handbook: dataset_mixture.seed)."""
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
    system_message: Literal["keep", "merge", "drop"] = "keep"
    """A chat row's system message with `template: chat`: `keep` hands it to the chat template (a template with no
    system role, as Gemma-2's and Mistral-v0.1's, then refuses the row, naming this key); `merge` puts its text at
    the head of the first user turn, then a blank line (where such a template can carry it); `drop` leaves it out.
    With `template: alpaca` a system message is always text at the head of the prompt."""
    max_chars: int = 1_000_000
    """Refuse (or, with `skip_bad_rows`, skip) a row whose text fields hold more characters than this: a
    multi-megabyte prompt is a broken row, and tokenizing it can take tens of GB of memory."""

    def __post_init__(self):
        check_ranges(self, limit=dict(ge=0), max_chars=dict(ge=1), near_dedup_threshold=dict(gt=0, le=1),
                     near_dedup_ngram=dict(ge=1), near_dedup_num_perm=dict(ge=2))
        check_source(self)
        # parts given as mappings in Python (from_dict builds MixturePart itself)
        self.mixture = [m if isinstance(m, MixturePart) else MixturePart(**m) for m in self.mixture]
        if self.mixture:
            if self.path:
                raise FieldError("mixture", f"is set beside path {self.path!r}: name the rows by one of the two")
            for key, unset in (("split", ""), ("name", ""), ("revision", ""), ("format", "auto"),
                               ("field_prefix", "")):
                if getattr(self, key) != unset:
                    raise FieldError(key, "is set beside a mixture: set it on each part of `mixture`")
            if self.columns:
                raise FieldError("columns", "is set beside a mixture: set it on each part of `mixture`")
            if sum(part.weight for part in self.mixture) <= 0:
                raise FieldError("mixture", "weights sum to 0: no part would give a row (weight is the fraction "
                                 "of a part's rows taken, 0 to 1)")
        if self.languages:
            from prefopt.data.clean import check_languages

            try:
                check_languages(self.languages)
            except ValueError as e:
                raise FieldError("languages", str(e)) from None
