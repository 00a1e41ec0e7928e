"""The `reverse` task: write a list of letters in reverse order. Skill: position (copying back to front), where
`sort` needs value order and `lookup` needs retrieval.

    instruction: "Reverse the order of the letters."   input: "q d w"   output: "w d q"

Demonstrations go wrong the way a weak model does (the input copied unchanged, rotated by one, two neighbours
swapped, a letter dropped or doubled); the annotator's candidates add sampling slips (a letter replaced, inserted
or deleted). Gold: 1 iff the response is exactly the reversed list; otherwise half the fraction of positions that
hold the right letter, so degrees of wrong stay visible.
"""

from __future__ import annotations

import random
import string

from prefopt.gold.base import list_mistake, pool_with_slips, positional_credit, random_mistake

INSTRUCTIONS = [
    "Reverse the order of the letters.",
    "Write these letters backwards.",
    "List the letters in reverse order.",
    "Reverse this sequence of letters.",
]
ALPHABET = list(string.ascii_lowercase)
MISTAKES = ["copy_input", "rotate", "adjacent_swap", "drop", "duplicate"]


def mistake(xs: list[str], kind: str, rng: random.Random) -> list[str] | None:
    """One wrong answer of type `kind` for input `xs`, or None when that kind is not wrong for `xs`."""
    r = xs[::-1]
    if kind == "copy_input":
        out = list(xs)
    elif kind == "rotate":  # the reversal started one place late
        out = r[1:] + r[:1]
    elif kind == "adjacent_swap":
        if len(r) < 2:
            return None
        i = rng.randrange(len(r) - 1)
        out = list(r)
        out[i], out[i + 1] = out[i + 1], out[i]
    else:  # drop, duplicate (None: not wrong for xs, passed on)
        out = list_mistake(kind, r, rng, MISTAKES)
    return None if out == r else out


def score_letters(xs: list[str], response: str) -> float:
    """1.0 iff `response` is the reversed list; else 0.5 * (positions holding the right letter) / max length."""
    return positional_credit(xs[::-1], response.split())


class ReverseTask:
    name = "reverse"
    instructions = INSTRUCTIONS

    @staticmethod
    def sample_input(rng: random.Random, cfg) -> str:
        n = rng.randint(cfg.min_len, cfg.max_len)
        xs = rng.sample(ALPHABET, n) if cfg.distinct else [rng.choice(ALPHABET) for _ in range(n)]
        return " ".join(xs)

    @staticmethod
    def score(input: str, response: str) -> float:
        return score_letters(input.split(), response)

    @staticmethod
    def demo_mistake(input: str, rng: random.Random) -> str:
        xs = input.split()
        found = random_mistake(lambda kind: mistake(xs, kind, rng), MISTAKES, rng)
        if found is None:
            raise AssertionError(f"no wrong answer for {xs}")  # unreachable: `duplicate` is always wrong
        return " ".join(found[0])

    @staticmethod
    def response_pool(input: str, rng: random.Random) -> list[str]:
        xs = input.split()
        wrong = [mistake(xs, k, rng) for k in MISTAKES]
        return pool_with_slips(" ".join(xs[::-1]), [" ".join(w) for w in wrong if w], ALPHABET, rng)
