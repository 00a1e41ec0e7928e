"""The `sort` task: sort a list of digits, in Alpaca format, with a gold reward a program computes.

    instruction: "Sort the numbers in ascending order."   input: "3 1 2"   output: "1 2 3"

Everything a CPU run needs to show that each stage really works:
  - SFT demonstrations that are right only `demo_accuracy` of the time; the rest carry the mistakes a weak policy
    makes (one adjacent swap, the input order copied, descending order, an element dropped or duplicated);
  - candidates for the simulated annotator (`prefopt.gold.base.annotate`): systematic mistakes and sampling slips;
  - `score_numbers`, the evaluation's ground truth.
"""

from __future__ import annotations

import random
import re
from collections import Counter

from prefopt.gold.base import annotate  # noqa: F401  (re-exported: every task's simulated annotator)
from prefopt.gold.base import list_mistake, random_mistake

INSTRUCTIONS = [
    "Sort the numbers in ascending order.",
    "Sort these numbers from smallest to largest.",
    "Arrange the numbers in ascending order.",
    "Put the numbers in increasing order.",
]
MISTAKES = ["adjacent_swap", "copy_input", "descending", "drop", "duplicate"]

_INPUT_RE = re.compile(r"### Input:\n(.*?)(?:\n\n### Response:|$)", re.S)
_DIGITS_LINE = re.compile(r"^\s*\d+(?:\s+\d+)*\s*$")


def format_list(xs: list[int]) -> str:
    return " ".join(str(x) for x in xs)


def parse_input(prompt: str) -> list[int]:
    """The numbers to sort, from a rendered Alpaca prompt (the text after `### Input:`), a chat rendering (the last
    line of digits), or the bare input `"3 1 2"`. Raises ValueError when there are none."""
    m = _INPUT_RE.search(prompt)
    if m:
        text = m.group(1)
    else:
        lines = [ln for ln in prompt.splitlines() if _DIGITS_LINE.match(ln)]
        if not lines:
            raise ValueError(f"no list of numbers in prompt {prompt[:80]!r}")
        text = lines[-1]
    try:
        return [int(t) for t in text.split()]
    except ValueError:
        raise ValueError(f"the input {text!r} is not a list of integers") from None


def _in_order_fraction(ys: list[int]) -> float:
    if len(ys) < 2:
        return 1.0
    return sum(a <= b for a, b in zip(ys, ys[1:])) / (len(ys) - 1)


def _multiset_overlap(xs: list[int], ys: list[int]) -> float:
    """|xs ∩ ys| / max(|xs|, |ys|) as multisets: 1 iff ys is a permutation of xs."""
    if not xs and not ys:
        return 1.0
    common = sum((Counter(xs) & Counter(ys)).values())
    return common / max(len(xs), len(ys))


def score_numbers(xs: list[int], response: str) -> float:
    """Gold score in [0, 1] of `response` for input `xs`.

    1.0 iff the response, stripped, is exactly the sorted list joined by single spaces. Otherwise partial credit
    below 1: 0.5 * (fraction of adjacent pairs in order) * (multiset overlap with the input), and 0 for a response
    that is not a list of integers. Graded, so a reward model and the evaluation see degrees of wrong."""
    text = response.strip()
    if text == format_list(sorted(xs)):
        return 1.0
    try:
        ys = [int(t) for t in text.split()]
    except ValueError:
        return 0.0
    if not ys:
        return 0.0
    return 0.5 * _in_order_fraction(ys) * _multiset_overlap(xs, ys)


def gold_score(prompt: str, response: str) -> float:
    """Gold score of `response` to a rendered prompt (or bare input text); see `score_numbers`."""
    return score_numbers(parse_input(prompt), response)


# ------------------------------------------------------------------------------------------------ data


def random_input(rng: random.Random, min_len: int, max_len: int, distinct: bool = False) -> list[int]:
    n = rng.randint(min_len, max_len)
    if distinct:
        return rng.sample(range(10), n)
    return [rng.randrange(10) for _ in range(n)]


def mistake(xs: list[int], kind: str, rng: random.Random) -> list[int] | None:
    """One realistic wrong answer of type `kind`, or None when that kind cannot be wrong for `xs`."""
    s = sorted(xs)
    if kind == "adjacent_swap":
        spots = [i for i in range(len(s) - 1) if s[i] != s[i + 1]]
        if not spots:
            return None
        i = rng.choice(spots)
        s[i], s[i + 1] = s[i + 1], s[i]
        out = s
    elif kind == "copy_input":
        out = list(xs)
    elif kind == "descending":
        out = s[::-1]
    else:  # drop, duplicate (None: not wrong for xs, passed on)
        out = list_mistake(kind, s, rng, MISTAKES)
    return None if out == sorted(xs) else out


def wrong_answer(xs: list[int], rng: random.Random) -> tuple[str, str]:
    """(response, mistake kind) for a random mistake that is really wrong for `xs`."""
    found = random_mistake(lambda kind: mistake(xs, kind, rng), MISTAKES, rng)
    if found is None:
        raise AssertionError(f"no wrong answer for {xs}")  # unreachable: `duplicate` is always wrong
    return format_list(found[0]), found[1]


def corrupt(ys: list[int], rng: random.Random) -> list[int]:
    """A sampling slip of the kind a policy makes at temperature 1: one digit replaced, inserted or deleted.

    The reward model must see these (not only the systematic mistakes of the demonstrations), or it learns
    "looks sorted" instead of "is the sorted input" and the aligners exploit the gap."""
    ys = list(ys)
    op = rng.choice(["replace", "insert", "delete"] if len(ys) > 1 else ["replace", "insert"])
    i = rng.randrange(len(ys))
    if op == "replace":
        ys[i] = rng.choice([d for d in range(10) if d != ys[i]])
    elif op == "insert":
        ys.insert(rng.randrange(len(ys) + 1), rng.randrange(10))
    else:
        del ys[i]
    return ys


def response_pool(xs: list[int], rng: random.Random, slips: int = 6) -> list[str]:
    """Distinct candidate responses for one input: the correct answer first, the systematic mistakes, and up to
    `slips` sampling slips of the correct answer (a third of them with a second slip); many slips stay sorted, so
    sortedness alone cannot tell them from the answer."""
    pool = [format_list(sorted(xs))]
    for kind in MISTAKES:
        out = mistake(xs, kind, rng)
        if out is not None and format_list(out) not in pool:
            pool.append(format_list(out))
    for _ in range(slips):
        ys = corrupt(sorted(xs), rng)
        if rng.random() < 0.3:
            ys = corrupt(ys, rng)
        if ys and format_list(ys) not in pool:
            pool.append(format_list(ys))
    return pool


class SortTask:
    """The sort task in the GoldTask form (`prefopt.gold.base`); skill: ordering by value."""

    name = "sort"
    instructions = INSTRUCTIONS

    @staticmethod
    def sample_input(rng: random.Random, cfg) -> str:
        return format_list(random_input(rng, cfg.min_len, cfg.max_len, cfg.distinct))

    @staticmethod
    def score(input: str, response: str) -> float:
        return score_numbers(parse_input(input), response)

    @staticmethod
    def demo_mistake(input: str, rng: random.Random) -> str:
        return wrong_answer(parse_input(input), rng)[0]

    @staticmethod
    def response_pool(input: str, rng: random.Random) -> list[str]:
        return response_pool(parse_input(input), rng)
