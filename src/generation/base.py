"""The generation interface every backend implements (vLLM on GPUs, transformers here).

    gen = make_generator(model_path, backend="auto", batch_size=64)
    outs = gen.generate(["<rendered prompt>", ...], Sampling(n=4, temperature=1.0, max_new_tokens=32, seed=0))
    outs[i][j].text, outs[i][j].token_ids, outs[i][j].finished

Prompts are already rendered text (see prefopt.data.templates.render_prompt). PPO and evaluation use the same
interface; the transformers backend can also wrap a model already in memory (a policy being trained).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Protocol

# Called as progress(prompts_done, tokens_generated) after each piece of work (a batch), for progress bars.
Progress = Optional[Callable[[int, int], None]]


@dataclass
class Sampling:
    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """0: greedy (the n samples are then one greedy answer, repeated)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p (1: off)."""
    max_new_tokens: int = 32
    seed: int = 0
    """Seeds the sampling so the same call gives the same candidates."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    text: str
    """Decoded response without special tokens."""
    token_ids: list[int] = field(default_factory=list)
    """Response token ids, including the EOS token when one was emitted, excluding padding."""
    finished: bool = True
    """True when the model emitted EOS (False: cut at max_new_tokens)."""


class Generator(Protocol):
    name: str

    def generate(self, prompts: list[str], sampling: Sampling, progress: Progress = None) -> list[list[Completion]]:
        """One list of `sampling.n` completions per prompt, in prompt order."""
        ...


def generate_many(generator, prompts: list[str], samplings: list[Sampling],
                  progress: Progress = None) -> list[list[list[Completion]]]:
    """`generator.generate` under each sampling: result[k][i] = prompt i under samplings[k]. A backend with its own
    `generate_many` (vLLM: every (seed, prompt) request in one engine call) does it at once; others loop."""
    if hasattr(generator, "generate_many"):
        return generator.generate_many(prompts, samplings, progress)
    return [generator.generate(prompts, s, progress=progress) for s in samplings]


def derive_seed(*parts: int) -> int:
    """A seed for one piece of work from (seed, shard, batch, ...): independent streams per piece, and the same
    stream whenever the same piece is redone, whatever ran before it."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
