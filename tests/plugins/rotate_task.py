"""A task written after the quickstart recipe was fixed, to check its gains off its own tasks (docs/methods.md):
move the first digit to the end (`3 8 1 4` -> `8 1 4 3`).

    PYTHONPATH=tests prefopt run experiments/quickstart.yaml --task.module=plugins.rotate_task --name=rotate
"""

import random

name = "rotate"
instructions = ["Move the first number to the end of the list.", "Rotate the list left by one place."]


def sample_input(rng: random.Random, cfg) -> str:
    return " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(cfg.min_len, cfg.max_len)))


def _want(input: str) -> list[str]:
    xs = input.split()
    return xs[1:] + xs[:1]


def score(input: str, response: str) -> float:
    want, got = _want(input), response.split()
    if got == want:
        return 1.0
    return 0.5 * sum(a == b for a, b in zip(want, got)) / max(len(want), len(got), 1)


def demo_mistake(input: str, rng: random.Random) -> str:
    xs, r = input.split(), rng.random()
    if r < 0.3:
        return input                                    # copied
    if r < 0.6:
        return " ".join(xs[-1:] + xs[:-1])              # rotated the wrong way
    want = _want(input)
    if r < 0.8:
        return " ".join(want[:-1])                      # last item dropped
    i = rng.randrange(len(want) - 1)
    want[i], want[i + 1] = want[i + 1], want[i]         # adjacent swap
    return " ".join(want)


def response_pool(input: str, rng: random.Random) -> list[str]:
    xs, want = input.split(), _want(input)
    pool = [" ".join(want), input, " ".join(xs[-1:] + xs[:-1]), " ".join(want[:-1])]
    return list(dict.fromkeys(pool))
