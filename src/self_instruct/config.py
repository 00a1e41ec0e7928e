from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefopt.config import FieldError, check_range, check_ranges
from prefopt.data.spec import DatasetSpec
from prefopt.generation.limits import temperature_problem  # the limits only: vllm is not imported

# Stanford Alpaca's generate_instruction.py: words that ask for what a text model cannot give (self-instruct's
# "image, picture, graph" list as Alpaca extended it). Matched as whole words, case-insensitively.
BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]


@dataclass
class SelfInstructConfig:
    """The `self_instruct` stage: new instruction/input/output tasks from seed tasks (Wang et al. 2022; Alpaca)."""

    model: str = ""
    """The language model that writes new tasks: a local folder or a hub id (self-instruct used GPT-3 davinci,
    Alpaca text-davinci-003). Required when the stage runs; it runs before `base`, so not a `stage:` reference."""
    seed_tasks: DatasetSpec = field(default_factory=lambda: DatasetSpec(
        path="../shared/data/stanford_alpaca/seed_tasks.jsonl", format="alpaca", skip_bad_rows=True))
    """The human-written seed tasks (Stanford's 175 seed_tasks.jsonl, or any Alpaca-format file). Rows that cannot
    be read are counted, with examples, in the summary."""
    num_instructions: int = 100
    """Stop once this many new tasks are accepted (Alpaca's script default: 100; their release: 52K)."""
    max_batches: int = 100
    """Stop after this many batches even short of `num_instructions` (a weak model may never get there)."""
    batch_size: int = 5
    """Prompts per batch (Alpaca's request_batch_size: 5). A batch's accepted tasks join the pool together and are
    appended to `batches.jsonl` in one line: a killed run resumes after the last whole batch."""
    prompt_tasks: int = 3
    """Example tasks in each prompt (Alpaca: 3; self-instruct: 8)."""
    prompt_generated: int = 1
    """Of those, at most this many are drawn from the model's own accepted tasks, the rest from the seeds
    (self-instruct: 2 of 8; Alpaca: 0). Fewer while the pool of generated tasks is smaller."""
    list_length: int = 20
    """The prompt asks for a list of this many tasks (Alpaca: 20); the model continues after the examples and
    tasks numbered past the list are dropped, as Alpaca's stop sequences do."""
    similarity_threshold: float = 0.7
    """A new instruction is kept only when its ROUGE-L F1 with every instruction in the pool (seeds and accepted
    ones) is below this (self-instruct and Alpaca: 0.7)."""
    min_words: int = 4
    """Shortest instruction in words (Alpaca and self-instruct drop those of 3 words or fewer)."""
    max_words: int = 150
    """Longest instruction in words (Alpaca: 150)."""
    blacklist: list[str] = field(default_factory=lambda: list(BLACKLIST))
    """Instructions containing one of these (whole words, any case) are dropped: a text model cannot do them."""
    drop_write_a_program: bool = True
    """Drop instructions starting "Write a program" (Alpaca: the model tacked it onto many tasks)."""
    include_seed_tasks: bool = False
    """Also write the seed tasks into data.json (Alpaca's release holds only the generated ones)."""
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    """`auto` picks vLLM when it can run (CUDA and vllm installed), else transformers."""
    temperature: float = 1.0
    """Sampling temperature (Alpaca: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (Alpaca: 1.0)."""
    max_new_tokens: int = 3072
    """Longest completion in tokens (Alpaca: 3072); a task cut off here is dropped."""
    seed: int = 0
    """Sampling seed. Each batch's examples and sampling derive from it, the experiment seed and the batch index,
    so a resumed run writes exactly what an uninterrupted one would."""
    dtype: str = "auto"
    """vLLM / transformers dtype (auto, bfloat16, float16, float32)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per model replica."""
    gpu_memory_utilization: float = 0.9
    """vLLM: fraction of GPU memory for weights and KV cache."""
    examples_per_reason: int = 3
    """Examples of each skip reason kept in the summary."""

    def __post_init__(self):
        for name in ("num_instructions", "max_batches", "batch_size", "prompt_tasks", "max_new_tokens",
                     "tensor_parallel_size", "min_words", "max_words"):
            check_range(self, name, ge=1)
        check_ranges(self, prompt_generated=dict(ge=0, le=self.prompt_tasks), list_length=dict(gt=self.prompt_tasks),
                     similarity_threshold=dict(gt=0, le=1), max_words=dict(ge=self.min_words), temperature=dict(ge=0),
                     top_p=dict(gt=0, le=1), gpu_memory_utilization=dict(gt=0, le=1), examples_per_reason=dict(ge=0))
        problem = temperature_problem(self.temperature)  # the limits vLLM samples within
        if problem:
            raise FieldError("temperature", problem)
