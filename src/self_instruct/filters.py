"""Self-instruct's filters, each a pure function of one generated task, and the ROUGE-L similarity pool.

The rules are those of self-instruct (Wang et al. 2022, Sec. 2.3 "Filtering and Postprocessing") as Stanford
Alpaca's generate_instruction.py applies them, in the same order:

    length       instructions of 3 words or fewer, or more than 150, are dropped
    blacklist    words a text model cannot act on (image, graph, file, ...), as whole words, any case
    program      instructions starting "Write a program" (Alpaca: the model tacked it on everywhere)
    punctuation  instructions starting with a punctuation character
    non-ASCII    instructions starting with a non-ASCII character (the prompt asks for English)
    output       an empty output, or one that repeats the input (the paper's "invalid generation" heuristics)
    similarity   ROUGE-L F1 with any instruction already in the pool (seeds and accepted) at or above 0.7

`reject_reason` returns the first rule a task breaks (the reason it is counted under), or None; the similarity
test needs the pool and runs last, since it is the only costly one.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from functools import lru_cache

from rouge_score import rouge_scorer


def word_count(instruction: str) -> int:
    return len(instruction.split())


def too_short(instruction: str, min_words: int) -> bool:
    return word_count(instruction) < min_words


def too_long(instruction: str, max_words: int) -> bool:
    return word_count(instruction) > max_words


@lru_cache(maxsize=256)
def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"\b{re.escape(word)}\b", flags=re.IGNORECASE)


def blacklisted_word(instruction: str, blacklist: list[str] | tuple[str, ...]) -> str | None:
    """The first blacklisted word found as a whole word ("graphs" matches `graphs`, "paragraph" matches nothing)."""
    for word in blacklist:
        if _word_pattern(word).search(instruction):
            return word
    return None


def writes_a_program(instruction: str) -> bool:
    return instruction.startswith("Write a program")


def starts_with_punctuation(instruction: str) -> bool:
    return bool(instruction) and instruction[0] in string.punctuation


def starts_non_ascii(instruction: str) -> bool:
    return bool(instruction) and not instruction[0].isascii()


def invalid_output(output: str, input: str = "") -> str | None:
    """Why an output is unusable: "empty_output", "output_repeats_input", or None."""
    if not output.strip():
        return "empty_output"
    if input.strip() and " ".join(output.split()) == " ".join(input.split()):
        return "output_repeats_input"
    return None


def reject_reason(task: dict, *, min_words: int = 4, max_words: int = 150, blacklist=(),
                  drop_write_a_program: bool = True) -> str | None:
    """The first rule (bar similarity) that `task` {instruction, input, output} breaks, or None."""
    inst = task["instruction"]
    if too_short(inst, min_words):
        return "too_short"
    if too_long(inst, max_words):
        return "too_long"
    if blacklisted_word(inst, tuple(blacklist)):
        return "blacklisted"
    if drop_write_a_program and writes_a_program(inst):
        return "write_a_program"
    if starts_with_punctuation(inst):
        return "starts_with_punctuation"
    if starts_non_ascii(inst):
        return "starts_non_ascii"
    return invalid_output(task["output"], task.get("input", ""))


class SimilarityPool:
    """The instructions so far, tokenized once, and the highest ROUGE-L F1 of a new one against them.

    Tokens are rouge-score's own (lower-cased alphanumeric words, no stemming: Alpaca's `use_stemmer=False`) and
    the F1 is `rouge_scorer._score_lcs`'s, as Alpaca computes it. Alpaca compares a candidate with the whole pool
    (in a process pool); at 52K instructions that is hours per batch. Here an inverted index gives, for every
    instruction sharing a token with the candidate, the shared token count, which bounds the LCS:
    F1 = 2 LCS / (m + n) <= 2 shared / (m + n). Instructions are then scored in decreasing bound order until the
    bound falls below the best F1 found; the answer is the brute-force maximum (ties: the earliest instruction),
    which the tests check."""

    def __init__(self, instructions: list[str] = ()):
        self._tokenizer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer
        self.instructions: list[str] = []
        self._tokens: list[list[str]] = []
        self._lengths: list[int] = []
        # token -> (indices of the instructions holding it, how often each holds it)
        self._postings: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for inst in instructions:
            self.add(inst)

    def __len__(self) -> int:
        return len(self.instructions)

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.tokenize(text)

    def add(self, instruction: str) -> None:
        tokens = self.tokenize(instruction)
        for token, count in Counter(tokens).items():
            ids, counts = self._postings[token]
            ids.append(len(self.instructions))
            counts.append(count)
        self.instructions.append(instruction)
        self._tokens.append(tokens)
        self._lengths.append(len(tokens))

    def most_similar(self, instruction: str) -> tuple[float, str | None]:
        """(highest ROUGE-L F1 against the pool, the instruction that reaches it); (0.0, None) when no instruction
        shares a word with it."""
        import numpy as np

        tokens = self.tokenize(instruction)
        shared = np.zeros(len(self.instructions))
        for token, count in Counter(tokens).items():
            if token in self._postings:
                ids, counts = self._postings[token]
                shared[ids] += np.minimum(counts, count)  # an instruction holds a token once in its postings
        ids = np.flatnonzero(shared)
        bounds = 2 * shared[ids] / (len(tokens) + np.asarray(self._lengths)[ids])
        best, best_i = 0.0, None
        for j in np.argsort(-bounds, kind="stable"):  # equal bounds stay in pool order
            if bounds[j] < best - 1e-12:  # no instruction left can beat (or tie) the best
                break
            i = int(ids[j])
            f = rouge_scorer._score_lcs(self._tokens[i], tokens).fmeasure
            if f > best or (f == best and best_i is not None and i < best_i):
                best, best_i = f, i
        return best, (self.instructions[best_i] if best_i is not None else None)
