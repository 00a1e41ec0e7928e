"""The `lookup` task: read values out of a small table of key=value pairs. Skill: retrieval (find a key, copy what
follows it), where `sort` needs value order and `reverse` needs position.

    instruction: "Give the values of the keys asked for."   input: "k=3 b=8 x=1 m=5 ? b x"   output: "8 1"

One or two keys are asked for. Demonstrations go wrong the way a weak model does (the value of the key after the
one asked, the first value in the table, the keys echoed, the answers in the wrong order, one answer missing);
the annotator's candidates add sampling slips (a digit replaced, inserted or deleted). Gold: 1 iff the response is
exactly the values asked for, in order; otherwise half the fraction of positions holding the right value.
"""

from __future__ import annotations

import random
import string

from prefopt.gold.base import pool_with_slips, positional_credit, random_mistake

INSTRUCTIONS = [
    "Give the values of the keys asked for.",
    "Look up the keys after the question mark.",
    "What values do the asked keys have?",
    "Answer with the value of each key asked for.",
]
KEYS = list(string.ascii_lowercase)
DIGITS = [str(d) for d in range(10)]
MISTAKES = ["next_key", "first_value", "echo_keys", "swap_order", "drop"]


def parse(input: str) -> tuple[list[tuple[str, str]], list[str]]:
    """("k=3 b=8 ? b") -> ([("k", "3"), ("b", "8")], ["b"]). Raises ValueError on anything else."""
    table, sep, asked = input.partition("?")
    if not sep:
        raise ValueError(f"no '?' in lookup input {input!r}")
    pairs = []
    for item in table.split():
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"bad table entry {item!r} in lookup input {input!r}")
        pairs.append((k, v))
    return pairs, asked.split()


def answer(pairs: list[tuple[str, str]], asked: list[str]) -> list[str]:
    d = dict(pairs)
    return [d[k] for k in asked]


def mistake(pairs, asked, kind: str, rng: random.Random) -> list[str] | None:
    right = answer(pairs, asked)
    keys = [k for k, _ in pairs]
    if kind == "next_key":  # off by one entry in the table
        out = [pairs[(keys.index(k) + 1) % len(pairs)][1] for k in asked]
    elif kind == "first_value":
        out = [pairs[0][1] for _ in asked]
    elif kind == "echo_keys":
        out = list(asked)
    elif kind == "swap_order":
        if len(right) < 2:
            return None
        out = right[::-1]
    elif kind == "drop":
        if len(right) < 2:
            return None
        out = right[:-1] if rng.random() < 0.5 else right[1:]
    else:
        raise ValueError(f"unknown mistake {kind!r}; mistakes are {MISTAKES}")
    return None if out == right else out


def score_values(input: str, response: str) -> float:
    """1.0 iff `response` is the asked values in order; else 0.5 * (positions right) / max length."""
    return positional_credit(answer(*parse(input)), response.split())


class LookupTask:
    name = "lookup"
    instructions = INSTRUCTIONS

    @staticmethod
    def sample_input(rng: random.Random, cfg) -> str:
        n = rng.randint(cfg.min_len, cfg.max_len)
        keys = rng.sample(KEYS, n)
        pairs = [(k, rng.choice(DIGITS)) for k in keys]
        asked = rng.sample(keys, min(n, rng.randint(1, 2)))
        return " ".join(f"{k}={v}" for k, v in pairs) + " ? " + " ".join(asked)

    @staticmethod
    def score(input: str, response: str) -> float:
        return score_values(input, response)

    @staticmethod
    def demo_mistake(input: str, rng: random.Random) -> str:
        pairs, asked = parse(input)
        found = random_mistake(lambda kind: mistake(pairs, asked, kind, rng), MISTAKES, rng)
        if found is not None:
            return " ".join(found[0])
        # every kind can coincide with the answer (e.g. equal values): a slipped digit is always wrong
        right = answer(pairs, asked)
        return " ".join(right[:-1] + [str((int(right[-1]) + 1) % 10)])

    @staticmethod
    def response_pool(input: str, rng: random.Random) -> list[str]:
        pairs, asked = parse(input)
        wrong = [mistake(pairs, asked, k, rng) for k in MISTAKES]
        return pool_with_slips(" ".join(answer(pairs, asked)), [" ".join(w) for w in wrong if w], DIGITS, rng)
