"""The vLLM backend, for GPU machines: `vllm.LLM(...).generate(prompts, SamplingParams(...))`.

    gen = VLLMGenerator("runs/quickstart/sft/model", tensor_parallel_size=1, gpu_memory_utilization=0.9)
    outs = gen.generate(prompts, Sampling(n=5, temperature=0.8, top_p=0.95, max_new_tokens=2048, seed=13))

vllm is imported only when this generator is built, so the package imports (and its tests run) without it.
The request is built by two pure functions, `llm_kwargs` and `sampling_params_kwargs`, which are tested here
without vllm; what vllm then does with them can only be checked on a GPU machine.

vLLM, like the transformers backend, tokenizes a text prompt with the tokenizer's special tokens (one BOS).
"""

from __future__ import annotations

from typing import Any

from prefopt.generation.base import Completion, Progress, Sampling


def llm_kwargs(model_path: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
               dtype: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Arguments of `vllm.LLM`: the engine (weights sharded over `tensor_parallel_size` GPUs, KV cache in the
    given fraction of GPU memory). `seed` seeds the engine; each request also carries its own seed."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    return {
        "model": str(model_path),
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": dtype,
        "seed": seed,
    }


def sampling_params_kwargs(sampling: Sampling) -> dict[str, Any]:
    """Arguments of `vllm.SamplingParams` for one call. Greedy (temperature 0) asks for one sequence: the n
    greedy answers are identical, and `generate` repeats it, as the transformers backend does."""
    greedy = sampling.temperature == 0
    return {
        "n": 1 if greedy else sampling.n,
        "temperature": sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "seed": sampling.seed,
    }


def to_completions(request_output, n: int) -> list[Completion]:
    """One vLLM RequestOutput -> n Completions. `finish_reason == "stop"` means EOS was emitted (no stop strings
    are set); vLLM's token_ids keep that EOS, as Completion.token_ids does."""
    comps = [Completion(text=o.text, token_ids=list(o.token_ids), finished=o.finish_reason == "stop")
             for o in request_output.outputs]
    if len(comps) == 1 and n > 1:  # greedy: one answer, repeated
        comps = [Completion(comps[0].text, list(comps[0].token_ids), comps[0].finished) for _ in range(n)]
    return comps


class VLLMGenerator:
    name = "vllm"

    def __init__(self, model_path: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 dtype: str = "auto", seed: int = 0):
        import vllm  # only here: the package never needs vllm unless this backend is chosen

        self._vllm = vllm
        self.path = str(model_path)
        self.llm = vllm.LLM(**llm_kwargs(model_path, tensor_parallel_size, gpu_memory_utilization, dtype, seed))

    def generate(self, prompts: list[str], sampling: Sampling, progress: Progress = None) -> list[list[Completion]]:
        params = self._vllm.SamplingParams(**sampling_params_kwargs(sampling))
        # vLLM schedules all prompts itself (continuous batching): one call, its own progress bar.
        outputs = self.llm.generate(list(prompts), params, use_tqdm=progress is None)
        result = [to_completions(o, sampling.n) for o in outputs]
        if progress is not None:
            progress(len(prompts), sum(len(c.token_ids) for comps in result for c in comps))
        return result
