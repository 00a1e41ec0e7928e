"""Rows a stage skipped, dropped or cut, with the reason: noted where it happens, reported by `run_stage`.

    note("rows skipped by skip_bad_rows in prefs.jsonl", 3)

`run_stage` clears the notes before a stage, then prints them when it ends and writes them to the summary as
`counts` ({reason: n}); `prefopt run` repeats every stage's counts under its final table. A side channel on
purpose: the loaders and tokenizers that drop data sit several calls below the recipe that would have to pass
their counts up.
"""

from __future__ import annotations

_counts: dict[str, int] = {}


def note(reason: str, n: int) -> None:
    if n:
        _counts[reason] = _counts.get(reason, 0) + int(n)


def take() -> dict[str, int]:
    """The notes so far, and a clean slate."""
    out = dict(_counts)
    _counts.clear()
    return out


def describe(counts: dict[str, int]) -> str:
    return "; ".join(f"{n:,} {reason}" for reason, n in counts.items())
