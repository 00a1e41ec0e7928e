"""Pick a generation backend: vLLM where it can run (CUDA and vllm installed), transformers everywhere else."""

from __future__ import annotations

import importlib.util

from prefopt.generation.base import Generator


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot run here, or None when it can. Checks without importing vllm (slow, and it may fail)."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def resolve_backend(backend: str) -> str:
    """`auto` -> `vllm` or `transformers`; `vllm` where it cannot run -> ValueError saying why and what to do."""
    if backend not in ("auto", "vllm", "transformers"):
        raise ValueError(f"unknown generation backend {backend!r}; choose auto, vllm or transformers")
    if backend == "transformers":
        return backend
    reason = vllm_unavailable_reason()
    if backend == "auto":
        return "transformers" if reason else "vllm"
    if reason:
        raise ValueError(
            f"generation backend 'vllm' was asked for but cannot run: {reason}. Either install it on a GPU "
            "machine (`pip install -e .[vllm]`), or set `backend: transformers` (`--generate.backend=transformers`)."
        )
    return "vllm"


def make_generator(model_path: str, backend: str = "auto", *, batch_size: int = 64, dtype: str = "auto",
                   tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, seed: int = 0,
                   device: str | None = None, batch_invariant: bool = False) -> Generator:
    """A Generator for a checkpoint folder or hub id. Options that the chosen backend does not use are ignored
    (batch_size and device: transformers; tensor_parallel_size, gpu_memory_utilization and batch_invariant: vLLM.
    The transformers backend repeats its candidates for the same prompts, batch size and seed on the same machine)."""
    chosen = resolve_backend(backend)
    if chosen == "vllm":
        from prefopt.generation.vllm_backend import VLLMGenerator

        return VLLMGenerator(model_path, tensor_parallel_size=tensor_parallel_size,
                             gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed,
                             batch_invariant=batch_invariant)
    from prefopt.generation.hf import TransformersGenerator

    return TransformersGenerator(model_path, batch_size=batch_size, dtype=dtype, device=device)
