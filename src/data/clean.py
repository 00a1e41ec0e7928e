"""Cleaning canonical rows: normalise whitespace, drop empty answers, drop duplicates.

    rows, stats = clean_rows(rows, near_dedup=True)

Works on any canonical row form (SFT, preference, prompt): the text fields are `prompt` (a string or a list of chat
messages), `completion`, `chosen` and `rejected`; `meta` and ids are left alone. Normalising keeps line breaks and
indentation (code answers need them); only duplicate detection ignores all whitespace.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from prefopt.utils import content_hash

ANSWER_FIELDS = ("completion", "chosen", "rejected")
TEXT_FIELDS = ("prompt",) + ANSWER_FIELDS

_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
_NON_WORD = re.compile(r"[\W_]+")


def normalize_text(text: str) -> str:
    """NFC, Unix newlines, no trailing spaces on a line, at most one blank line in a row, stripped ends."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def _map_text(value: Any, fn) -> Any:
    """Apply `fn` to a text field: a string, or the contents of a message list."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [{**m, "content": fn(m["content"])} if isinstance(m, dict) and "content" in m else m for m in value]
    return value


def _flat(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in value if isinstance(m, dict))
    return value if isinstance(value, str) else ""


def _is_empty(value: Any) -> bool:
    if isinstance(value, list):
        return not value or any(not str(m.get("content", "")).strip() for m in value if isinstance(m, dict))
    return not (isinstance(value, str) and value.strip())


def dedup_key(row: dict) -> str:
    """Equal for rows whose prompt and answers differ only in whitespace."""
    return content_hash(*(" ".join(_flat(row[k]).split()) if k in row else None for k in TEXT_FIELDS))


def near_dedup_key(row: dict) -> str:
    """Equal for rows whose prompts have the same words, ignoring case, punctuation and whitespace."""
    return content_hash(" ".join(_NON_WORD.sub(" ", _flat(row.get("prompt")).casefold()).split()))


def clean_rows(
    rows: list[dict],
    normalize: bool = True,
    drop_empty: bool = True,
    dedup: bool = True,
    near_dedup: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Cleaned copies of `rows` (first occurrence kept, order kept) and counts of what was removed.

    stats: rows_in, rows_out, empty (a prompt or answer empty after normalising), duplicates (same prompt and answers
    up to whitespace), near_duplicates (same prompt words as an earlier row, whatever the answers)."""
    stats = {"rows_in": len(rows), "rows_out": 0, "empty": 0, "duplicates": 0, "near_duplicates": 0}
    seen: set[str] = set()
    seen_prompts: set[str] = set()
    out = []
    for row in rows:
        if normalize:
            row = {**row, **{k: _map_text(row[k], normalize_text) for k in TEXT_FIELDS if k in row}}
        if drop_empty and any(k in row and _is_empty(row[k]) for k in TEXT_FIELDS):
            stats["empty"] += 1
            continue
        if dedup:
            key = dedup_key(row)
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
        if near_dedup:
            key = near_dedup_key(row)
            if key in seen_prompts:
                stats["near_duplicates"] += 1
                continue
            seen_prompts.add(key)
        out.append(row)
    stats["rows_out"] = len(out)
    return out, stats
