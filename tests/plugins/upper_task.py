"""A complete task of one's own, in the GoldTask form (docs/tasks.md shows it): write a word in capitals."""

import random

name = "upper"
instructions = ["Write the word in capital letters."]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "maple", "ocean", "lemon", "candle"]


def sample_input(rng: random.Random, cfg) -> str:
    return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(cfg.min_len, cfg.max_len)))


def score(input: str, response: str) -> float:
    """1 iff the response is the input in capitals; else the fraction of letters right, halved."""
    want, got = input.upper(), response.strip()
    if got == want:
        return 1.0
    return 0.5 * sum(a == b for a, b in zip(want, got)) / max(len(want), len(got), 1)


def demo_mistake(input: str, rng: random.Random) -> str:
    return input if rng.random() < 0.5 else input.upper()[:-1]


def response_pool(input: str, rng: random.Random) -> list[str]:
    return [input.upper(), input, input.upper()[:-1], input.capitalize()]
