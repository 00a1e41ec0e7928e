"""The `annotate` section: what the feedback page serves and where its labels go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefopt.config import check_choice, check_range


@dataclass
class AnnotateConfig:
    source: Literal["pairs", "candidates"] = "pairs"
    """pairs: each row of `pairs` is one pair to label; candidates: two candidates per prompt, drawn (seeded) from
    the generate stage's shard-*.jsonl in `candidates`, so humans can label before any reward model exists."""
    pairs: str = "stage:pairs/pairs.jsonl"
    """A pairs or preference file (any format load_preferences reads: the pairs stage's pairs.jsonl, HH, Alpaca
    chosen/rejected, ...). The file's own chosen is not shown; each label records which
    answer the human chose as `chosen_source` ("chosen" = agrees with the file)."""
    candidates: str = "stage:generate"
    """A folder of generate shards (shard-*.jsonl), read when source is `candidates`."""
    out: str = ""
    """The preference JSONL that A/B labels are appended to; ties and skips go to the side file beside it
    (`<stem>.ties_skips.jsonl`). Empty: `<output_dir>/<name>/annotate/preferences.jsonl` (without an experiment
    config, `--out` is required)."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """How a prompt given as instruction/input or chat messages is written into the labels; use the template of
    the reward / dpo stage that will read them. Prompts that are already text are kept verbatim."""
    seed: int = 0
    """Seeds the A/B order of every pair (per pair, so a restarted page shows the same order) and which two
    candidates of a prompt are paired."""
    limit: int = 0
    """Serve only the first N pairs (0: all)."""
    annotator: str = ""
    """Annotator id filled in when the page opens (the page remembers the last id typed in that browser)."""
    host: str = "127.0.0.1"
    """Interface to listen on; 0.0.0.0 serves other machines (there is no login: use it on a trusted network)."""
    port: int = 7860
    """Port to listen on (0: a free one)."""

    def __post_init__(self):
        check_choice(self, "source", ("pairs", "candidates"))
        check_choice(self, "template", ("alpaca", "chat"))
        check_range(self, "limit", ge=0)
        check_range(self, "port", ge=0, le=65535)
