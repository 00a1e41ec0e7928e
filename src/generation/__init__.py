"""Sampling candidates from a policy: one interface (base.py), a vLLM and a transformers backend, and the
`generate` stage (prefopt.generate) samples through it."""

from prefopt.generation.base import Completion, Generator, Sampling, derive_seed
from prefopt.generation.factory import make_generator, resolve_backend, vllm_unavailable_reason

__all__ = ["Completion", "Generator", "Sampling", "derive_seed", "make_generator", "resolve_backend",
           "vllm_unavailable_reason"]
