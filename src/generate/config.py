from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefopt.config import FieldError, check_range, check_ranges
from prefopt.data.spec import DatasetSpec
from prefopt.generation.limits import temperature_problem  # the limits only: vllm itself is not imported


@dataclass
class GenerateConfig:
    """The `generate` stage: sample candidates per prompt from a policy."""

    model: str = "stage:sft"
    """The policy that samples: a stage (`stage:sft`), a local folder or a hub id."""
    prompts: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="stage:task/prompts.jsonl"))
    """Prompts (any format the loaders read; only the prompt is used)."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """How a prompt is rendered for the model."""
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    """`auto` picks vLLM when it can run (CUDA and vllm installed), else transformers."""
    n: int = 4
    """Candidates per prompt (ignored when `seeds` is set: one candidate per seed)."""
    seeds: list[int] = field(default_factory=list)
    """One sample per seed, as in the SimPO on-policy recipe (13, 21, 42, 79, 100); empty: `n` samples."""
    temperature: float = 1.0
    """Sampling temperature: 0 (greedy, one candidate per prompt) or in [0.01, 2], the values vLLM samples at as
    asked. SimPO's on-policy data: 0.8."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1: off). SimPO's on-policy data: 0.95."""
    max_new_tokens: int = 32
    """Longest response in tokens; a candidate cut here is recorded with `finished: false`."""
    seed: int = 0
    """Sampling seed when `seeds` is empty. Each shard's seed derives from it, the experiment seed, the round and
    the shard index, so a resumed run redoes a shard exactly."""
    batch_size: int = 64
    """Prompts per generate call (transformers backend)."""
    shard_size: int = 256
    """Prompts per output shard; a killed run redoes at most the unfinished shard."""
    drop_identical: bool = False
    """Drop prompts whose candidates are all identical (no preference signal; needs two or more candidates)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per model replica."""
    data_parallel: int = 1
    """Engines sampling at once, each in its own process on its own `tensor_parallel_size` GPUs and with its share
    of the shards (shard k to process k mod data_parallel); the shards are the files one process writes. 0: one per
    `tensor_parallel_size` visible GPUs (8 engines on an 8-GPU node)."""
    gpu_memory_utilization: float = 0.9
    """vLLM: fraction of GPU memory for weights and KV cache."""
    batch_invariant: bool = False
    """vLLM only: its batch-invariant mode (VLLM_BATCH_INVARIANT=1; beta, compute capability >= 8.0), without
    which the same seed gives the same candidates only for the same batch. Recorded in every shard's `generator`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """vLLM / transformers dtype; checked here, not by vLLM after minutes of loading."""

    def __post_init__(self):
        for name in ("n", "max_new_tokens", "batch_size", "shard_size", "tensor_parallel_size"):
            check_range(self, name, ge=1)
        check_range(self, "data_parallel", ge=0)
        check_ranges(self, temperature=dict(ge=0), top_p=dict(gt=0, le=1), gpu_memory_utilization=dict(gt=0, le=1))
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"'seeds' must be distinct (equal seeds give equal samples), got {self.seeds}")
        problem = temperature_problem(self.temperature, len(self.seeds) or self.n, "seeds" if self.seeds else "n")
        if problem:
            raise FieldError("temperature", problem)
