"""What the page shows: a list of pairs, each a prompt and two answers, read and checked before serving.

Two sources:
  pairs       any file load_preferences reads (the pairs stage's pairs.jsonl, HH, Alpaca chosen/rejected, ...);
              one row -> one pair; each label records as `chosen_source` whether the human agreed with the file
  candidates  the generate stage's shard-*.jsonl ({"prompt_id", "prompt", "candidates": [str, ...]}); per prompt
              two distinct candidates drawn with a seeded RNG
Pairs with an empty answer or two identical answers are skipped and counted (see `judgeable`).

A file that cannot be read (missing, bad JSON, missing or mistyped field) raises DataError naming the file, row and
field, so the page refuses it before it serves anything (exit code 3, like every data error).

`pair_id` is a hash of the prompt and the two answers (order-free): a restarted page, or a regenerated file with
the same content, finds the same ids, which is what resume keys on. `order(pair_id, seed)` is the seeded coin that
decides which answer is shown as A; it depends on nothing else, so a restart shows the same order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.data.errors import DataError
from prefopt.data.loaders import load_preferences
from prefopt.data.records import json_object, read_records
from prefopt.data.spec import DatasetSpec
from prefopt.io import content_hash


@dataclass
class Pair:
    pair_id: str
    prompt: Any
    """The canonical prompt (text, or chat messages with template `chat`), written as it is into the labels."""
    answers: tuple[str, str]
    """The two answers in the source's order: (chosen, rejected) for a pairs file, (i, j) for candidates."""
    sources: tuple[str, str]
    """Where each answer came from: ("chosen", "rejected"), or ("candidate 3", "candidate 0")."""
    origin: dict = field(default_factory=dict)
    """Provenance kept in each label row: file and row (and prompt_id for candidates)."""


def make_pair_id(prompt: Any, a: str, b: str) -> str:
    return content_hash(prompt, sorted([a, b]))


def order(pair_id: str, seed: int) -> tuple[int, int]:
    """Indices into `Pair.answers` shown as (A, B): a coin seeded by the pair alone, the same after a restart."""
    return (1, 0) if random.Random(f"{seed}:{pair_id}").random() < 0.5 else (0, 1)


def judgeable(a: str, b: str) -> bool:
    """Two answers a label can be kept for: neither empty, not the same text. The preference loaders refuse an
    empty answer in a hand-made file and a pair with no difference, so such a label could never be trained on."""
    return bool(a.strip()) and bool(b.strip()) and a.strip() != b.strip()


# `annotate.pairs` is a bare path: the loaders' advice (`skip_bad_rows`, a dataset-spec key) cannot be followed
PAIR_FILE_HINT = "fix or remove this row: the page serves the file as it is, bad rows are not skipped"


def load_pair_file(path: str | Path, template: str = "alpaca", limit: int = 0) -> tuple[list[Pair], int]:
    """Every row of a pairs/preference file as a Pair, and how many were not judgeable (skipped); DataError
    (file, row, field) on the first bad row."""
    # The pipeline's pairs may hold an empty candidate (the model stopped at once): a valid row, skipped below.
    spec = DatasetSpec(path=str(path), allow_empty_answers=True)
    rows = load_preferences(spec, template, bad_row_hint=PAIR_FILE_HINT).rows
    pairs, skipped = [], 0
    for n, r in enumerate(rows, start=1):
        if not judgeable(r["chosen"], r["rejected"]):
            skipped += 1
            continue
        pid = make_pair_id(r["prompt"], r["chosen"], r["rejected"])
        pairs.append(Pair(pid, r["prompt"], (r["chosen"], r["rejected"]), ("chosen", "rejected"),
                          {"file": str(path), "row": n}))
    pairs = _unique(pairs)
    return (pairs[:limit] if limit else pairs), skipped


def load_candidates(folder: str | Path, seed: int = 0, limit: int = 0) -> tuple[list[Pair], int]:
    """Two distinct non-empty candidates per prompt from generate shards; and how many prompts had no such two."""
    shards = sorted(Path(folder).glob("shard-*.jsonl"))
    if not shards:
        raise DataError(folder, None, None, "no candidate shards (shard-*.jsonl): run the generate stage first")
    pairs, skipped = [], 0
    for shard in shards:
        for n, rec in read_records(shard):
            pair = _candidate_pair(shard, n, rec, seed)
            if pair is None:
                skipped += 1
                continue
            pairs.append(pair)
            if limit and len(pairs) >= limit:
                return _unique(pairs), skipped
    if not pairs:
        raise DataError(folder, None, None, f"no prompt has two distinct non-empty candidates ({skipped} prompts)")
    return _unique(pairs), skipped


def _candidate_pair(path: Path, n: int, rec: Any, seed: int) -> Pair | None:
    json_object(path, n, rec)
    for key in ("prompt_id", "prompt", "candidates"):
        if rec.get(key) is None:
            raise DataError(path, n, key, "missing")
    prompt, cands = rec["prompt"], rec["candidates"]
    if not isinstance(prompt, (str, list)) or (isinstance(prompt, str) and not prompt.strip()):
        raise DataError(path, n, "prompt", "expected a non-empty string or a message list")
    if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
        raise DataError(path, n, "candidates", "expected a list of strings")
    # first occurrence of each non-empty text: any two of these are judgeable
    distinct = [i for i, c in enumerate(cands) if c.strip() and c.strip() not in {x.strip() for x in cands[:i]}]
    if len(distinct) < 2:
        return None
    i, j = random.Random(f"{seed}:{rec['prompt_id']}").sample(distinct, 2)
    return Pair(make_pair_id(prompt, cands[i], cands[j]), prompt, (cands[i], cands[j]),
                (f"candidate {i}", f"candidate {j}"), {"file": str(path), "row": n, "prompt_id": str(rec["prompt_id"])})


def _unique(pairs: list[Pair]) -> list[Pair]:
    """Drop repeated pairs (same prompt and answers): one label per pair and annotator is what resume assumes."""
    seen, out = set(), []
    for p in pairs:
        if p.pair_id not in seen:
            seen.add(p.pair_id)
            out.append(p)
    return out
