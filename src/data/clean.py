"""Cleaning canonical rows: normalise whitespace, drop empty answers, drop exact and near duplicates, keep languages.

    rows, stats = clean_rows(rows, near_dedup=True, languages=["en"])

Works on any canonical row form (SFT, preference, prompt): the text fields are `prompt` (a string or a list of chat
messages), `completion`, `chosen` and `rejected`; `meta` and ids are left alone. Normalising keeps line breaks and
indentation (code answers need them); only duplicate detection ignores all whitespace.

Exact duplicates: the same prompt and answers up to whitespace. Near duplicates: rows whose text (instruction,
input and answers, without the template's boilerplate) shares most of its word n-grams with an earlier row's
(Jaccard similarity of the shingle sets at or above a threshold), found with MinHash LSH (Broder 1997;
datasketch's MinHashLSH) and confirmed on the exact shingle sets, so LSH only decides which earlier rows are
compared and a match is never a false positive.

Languages: py3langid (langid.py's model, shipped in the wheel) names the language of each row's prompt, so a mixed
Chinese/English set can keep one of them (`DatasetSpec.languages`).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Any

from prefopt.io import content_hash

ANSWER_FIELDS = ("completion", "chosen", "rejected")
TEXT_FIELDS = ("prompt",) + ANSWER_FIELDS

_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
# Words for shingling: a run of letters/digits, except that each CJK character is a word of its own (Chinese and
# Japanese have no spaces, so a whole sentence would otherwise be one "word").
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


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


def prompt_text(row: dict) -> str:
    """What the language filter reads (answers can be code): the instruction and input where the loader kept them
    (the Alpaca template's boilerplate would make every pair of rows look alike), else the prompt's text."""
    meta = row.get("meta") or {}
    if isinstance(meta.get("instruction"), str):
        return "\n".join(t for t in (meta["instruction"], meta.get("input") or "") if t)
    if row.get("prompt") == "" and isinstance(row.get("completion"), str):
        return row["completion"]  # language-model text (`text` rows): no prompt, the text is all there is
    return _flat(row.get("prompt"))


def row_text(row: dict) -> str:
    """What near-dedup reads: `prompt_text` and the answers. The whole row, like exact dedup: on Alpaca's 52K the
    prompt alone calls "Summarize this abstract" and "Classify this abstract" with one long input duplicates."""
    return "\n".join([prompt_text(row)] + [_flat(row[k]) for k in ANSWER_FIELDS if k in row])


def shingles(text: str, n: int = 2) -> set[str]:
    """The word n-grams of `text`, case-folded, punctuation dropped; a text shorter than n words is one shingle."""
    words = _WORD.findall(text.casefold())
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


class NearDuplicates:
    """Remembers texts and says whether a new one is a near duplicate of one it has seen.

        nd = NearDuplicates(threshold=0.8, ngram=2, num_perm=128)
        nd.check_and_add(text)  -> the earlier text's index, or None (then `text` is remembered)

    One changed word in an L-word text touches n shingles, leaving a Jaccard similarity of (L-2n+1)/(L+1): with
    n = 2 such a copy reaches 0.8 from 19 words on, while short instructions that differ in a word (often a
    different task: "Name three fruits" / "Name three rivers") are kept. LSH finds the earlier rows likely to be
    that similar and each is then checked on the exact shingle sets, so the bands are chosen for recall
    (datasketch's weights 0.05 on false positives, 0.95 on false negatives): with 128 permutations a pair at
    Jaccard 0.8 is compared with probability 0.95, at 0.9 always; a pair at 0.5 costs one set comparison in 16."""

    def __init__(self, threshold: float = 0.8, ngram: int = 2, num_perm: int = 128):
        from datasketch import MinHashLSH

        if not 0 < threshold <= 1:
            raise ValueError(f"near-dedup threshold must be in (0, 1], got {threshold}")
        if ngram < 1 or num_perm < 2:
            raise ValueError(f"near-dedup needs ngram >= 1 and num_perm >= 2, got {ngram} and {num_perm}")
        self.threshold, self.ngram, self.num_perm = threshold, ngram, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
        self.sets: list[set[str]] = []

    def check_and_add(self, text: str) -> int | None:
        from datasketch import MinHash

        sh = shingles(text, self.ngram)
        if not sh:
            return None  # no words: nothing to compare (exact dedup still sees it)
        m = MinHash(num_perm=self.num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in sh])
        for key in sorted(self.lsh.query(m)):
            if jaccard(sh, self.sets[key]) >= self.threshold:
                return key
        self.lsh.insert(len(self.sets), m)
        self.sets.append(sh)
        return None


@lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE)


def known_languages() -> list[str]:
    return sorted(_language_identifier().labels)


def detect_language(text: str) -> str:
    """Code of the language `text` is written in (py3langid: ISO 639-1 where there is one), e.g. "en", "zh"."""
    return _language_identifier().classify(text)[0]


# Individual languages py3langid may name, and the ISO 639 macrolanguage they belong to. Measured: it calls 4-6% of
# the alpaca-chinese zh_ rows (Mandarin) "wuu" (Wu), so `languages: [zh]` must accept it.
MACROLANGUAGE = {"wuu": "zh", "yue": "zh", "ary": "ar", "arz": "ar", "uzs": "uz", "sdh": "ku"}


def in_languages(text: str, languages: list[str]) -> bool:
    """Whether `text` is in one of `languages`, by its detected code or that code's macrolanguage."""
    code = detect_language(text)
    return code in languages or MACROLANGUAGE.get(code) in languages


def check_languages(languages: list[str]) -> None:
    unknown = [code for code in languages if code not in known_languages()]
    if unknown:
        raise ValueError(f"unknown language code(s) {unknown}; py3langid knows {', '.join(known_languages())}")


def clean_rows(
    rows: list[dict],
    normalize: bool = True,
    drop_empty: bool = True,
    dedup: bool = True,
    near_dedup: bool = False,
    near_dedup_threshold: float = 0.8,
    near_dedup_ngram: int = 2,
    near_dedup_num_perm: int = 128,
    languages: list[str] | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Cleaned copies of `rows` (first occurrence kept, order kept) and counts of what was removed.

    stats: rows_in, rows_out, empty (a prompt or answer empty after normalising), other_language (detected language
    not in `languages`), duplicates (same prompt and answers up to whitespace), near_duplicates (a row whose word
    n-grams overlap an earlier row's by at least the threshold)."""
    stats = {"rows_in": len(rows), "rows_out": 0, "empty": 0, "other_language": 0, "duplicates": 0,
             "near_duplicates": 0}
    if languages:
        check_languages(languages)
    seen: set[str] = set()
    near = NearDuplicates(near_dedup_threshold, near_dedup_ngram, near_dedup_num_perm) if near_dedup else None
    out = []
    for row in rows:
        if normalize:
            row = {**row, **{k: _map_text(row[k], normalize_text) for k in TEXT_FIELDS if k in row}}
        if drop_empty and any(k in row and _is_empty(row[k]) for k in TEXT_FIELDS):
            stats["empty"] += 1
            continue
        if languages and not in_languages(prompt_text(row), languages):
            stats["other_language"] += 1
            continue
        if dedup:
            key = dedup_key(row)
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
        if near is not None and near.check_and_add(row_text(row)) is not None:
            stats["near_duplicates"] += 1
            continue
        out.append(row)
    stats["rows_out"] = len(out)
    return out, stats
