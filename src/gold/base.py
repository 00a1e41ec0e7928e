"""What every gold task shares: drawing distinct inputs, the simulated annotator, and the files a task writes.

A built-in task (or a user's, see docs/tasks.md) describes itself with five things and `build_data` does the rest:

    name           "sort"
    instructions   Alpaca instructions, one drawn per row
    sample_input(rng, cfg) -> str          the Alpaca `input` text of one example
    score(input, response) -> float        the gold score in [0, 1]; 1 iff the response is right
    demo_mistake(input, rng) -> str        a wrong answer of the kind a weak demonstrator writes
    response_pool(input, rng) -> [str]     distinct candidates for the annotator, the right answer first

Files (all Alpaca rows): sft (demonstrations, right `demo_accuracy` of the time), prompts (the policy's training
prompts: candidates and PPO rollouts), val_prompts (choosing hyperparameters, sweeps), test_prompts (the reported
figures), preferences (pairs labelled by the simulated annotator, each answer's gold score kept beside it).
Inputs are distinct across all files while the input space allows; test, then validation prompts are drawn
first, so they are the last to share an input when it runs out.
"""

from __future__ import annotations

import random
from typing import Protocol

FILES = ("sft", "prompts", "val_prompts", "test_prompts", "preferences")


class GoldTask(Protocol):
    name: str
    instructions: list[str]

    def sample_input(self, rng: random.Random, cfg) -> str: ...

    def score(self, input: str, response: str) -> float: ...

    def demo_mistake(self, input: str, rng: random.Random) -> str: ...

    def response_pool(self, input: str, rng: random.Random) -> list[str]: ...


def annotate(score_a: float, score_b: float, noise: float, rng: random.Random) -> int:
    """Simulated annotator: 0 if it prefers a, 1 if b. Prefers the higher gold score, picks at random on a tie,
    and flips its label with probability `noise` (AlpacaFarm's simulated annotators, Dubois et al. 2023, Sec. 3)."""
    if score_a == score_b:
        return rng.randrange(2)
    label = 0 if score_a > score_b else 1
    return 1 - label if rng.random() < noise else label


class UniqueInputs:
    """Draws inputs never drawn before (so the files are disjoint) while the space allows; when it runs out,
    repeats are allowed and counted."""

    def __init__(self, draw, tries: int = 100):
        self._draw, self.tries = draw, tries
        self.used: set[str] = set()
        self.repeats = 0

    def draw(self) -> str:
        for _ in range(self.tries):
            x = self._draw()
            if x not in self.used:
                self.used.add(x)
                return x
        self.repeats += 1
        return x


def preference_pair(pool: list[str], rng: random.Random, p_correct: float = 0.5) -> tuple[str, str]:
    """Two responses for the annotator. Half the pairs hold the right answer (pool[0]) against a wrong one: the
    comparisons best-of-n selection depends on, which uniform pairs from the pool would make rare."""
    if len(pool) < 2:
        raise ValueError(f"a response pool needs at least two distinct answers, got {pool!r}")
    if rng.random() < p_correct:
        return pool[0], rng.choice(pool[1:])
    a, b = rng.sample(pool, 2)
    return a, b


def build_data(task: GoldTask, cfg, seed: int) -> dict[str, list[dict]]:
    """The task's files as rows (`cfg` is a TaskConfig); `_repeats` counts inputs drawn more than once."""
    rng = random.Random(seed)
    inputs = UniqueInputs(lambda: task.sample_input(rng, cfg))

    def row(x: str) -> dict:
        return {"instruction": rng.choice(task.instructions), "input": x}

    def prompts(kind: str, n: int) -> list[dict]:
        tag = f"-{kind}" if kind else ""
        return [{"prompt_id": f"{task.name}{tag}-{i:06d}", **row(inputs.draw())} for i in range(n)]

    test = prompts("test", cfg.num_test_prompts)
    val = prompts("val", cfg.num_val_prompts)
    train = prompts("", cfg.num_prompts)

    sft = []
    for _ in range(cfg.num_sft):
        x = inputs.draw()
        r = row(x)
        if rng.random() < cfg.demo_accuracy:
            out = task.response_pool(x, rng)[0]
        else:
            out = task.demo_mistake(x, rng)
        sft.append({**r, "output": out, "correct": task.score(x, out) == 1.0})

    preferences = []
    for _ in range(cfg.num_preferences):
        x = inputs.draw()
        r = row(x)
        a, b = preference_pair(task.response_pool(x, rng), rng)
        ga, gb = task.score(x, a), task.score(x, b)
        pick = annotate(ga, gb, cfg.annotator_noise, rng)
        (chosen, gc), (rejected, gr) = ((a, ga), (b, gb)) if pick == 0 else ((b, gb), (a, ga))
        preferences.append({**r, "chosen": chosen, "rejected": rejected, "chosen_gold": gc, "rejected_gold": gr})
    return {"sft": sft, "prompts": train, "val_prompts": val, "test_prompts": test, "preferences": preferences,
            "_repeats": inputs.repeats}


def random_mistake(make, kinds, rng: random.Random) -> tuple[list, str] | None:
    """(wrong answer, kind) for a mistake kind drawn at random among those that are really wrong: `make(kind)`
    gives the answer with that mistake, or None where it would equal the right one. None if no kind is wrong."""
    kinds = list(kinds)
    rng.shuffle(kinds)
    for kind in kinds:
        out = make(kind)
        if out is not None:
            return out, kind
    return None


def positional_credit(want: list, got: list) -> float:
    """1.0 iff `got` is `want`; else 0.5 * (positions holding the right item) / the longer length (0 when empty)."""
    if got == want:
        return 1.0
    if not got:
        return 0.0
    return 0.5 * sum(a == b for a, b in zip(want, got)) / max(len(want), len(got))


def list_mistake(kind: str, right: list, rng: random.Random, mistakes: list[str]) -> list | None:
    """The mistakes list tasks share, made of the right answer: `drop` (one item left out; None for fewer than 2
    items) and `duplicate` (one item written twice). Another kind is an error naming the task's `mistakes`."""
    if kind == "drop":
        if len(right) < 2:
            return None
        i = rng.randrange(len(right))
        return right[:i] + right[i + 1:]
    if kind == "duplicate":
        i = rng.randrange(len(right))
        return right[: i + 1] + right[i:]
    raise ValueError(f"unknown mistake {kind!r}; mistakes are {mistakes}")


def slip(tokens: list[str], alphabet: list[str], rng: random.Random) -> list[str]:
    """A sampling slip of the kind a policy makes at temperature 1: one token replaced, inserted or deleted.

    The reward model must see these (not only the demonstrations' systematic mistakes), or it learns "looks
    right" instead of "is right" and the aligners exploit the gap."""
    ys = list(tokens)
    op = rng.choice(["replace", "insert", "delete"] if len(ys) > 1 else ["replace", "insert"])
    i = rng.randrange(len(ys)) if ys else 0
    if op == "replace" and ys:
        ys[i] = rng.choice([a for a in alphabet if a != ys[i]])
    elif op == "insert" or not ys:
        ys.insert(rng.randrange(len(ys) + 1), rng.choice(alphabet))
    else:
        del ys[i]
    return ys


def pool_with_slips(right: str, mistakes: list[str], alphabet: list[str], rng: random.Random,
                    slips: int = 6) -> list[str]:
    """Distinct candidates: the right answer first, the systematic mistakes, then up to `slips` sampling slips of
    the right answer (a third of them with a second slip)."""
    pool = [right]
    for m in mistakes:
        if m and m not in pool:
            pool.append(m)
    for _ in range(slips):
        ys = slip(right.split(), alphabet, rng)
        if rng.random() < 0.3:
            ys = slip(ys, alphabet, rng)
        text = " ".join(ys)
        if ys and text not in pool:
            pool.append(text)
    return pool
