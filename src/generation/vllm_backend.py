"""The vLLM backend, for GPU machines: `vllm.LLM(...).generate(prompts, SamplingParams(...))`.

    gen = VLLMGenerator("runs/quickstart/sft/model", tensor_parallel_size=1, gpu_memory_utilization=0.9)
    outs = gen.generate(prompts, Sampling(n=5, temperature=0.8, top_p=0.95, max_new_tokens=2048, seed=13))

vllm is imported only when this generator is built, so the package imports (and its tests run) without it.
The request is built by two pure functions, `llm_kwargs` and `sampling_params_kwargs`, which are tested here
without vllm; what vllm then does with them can only be checked on a GPU machine.

vLLM, like the transformers backend, tokenizes a text prompt with the tokenizer's special tokens (one BOS).

An engine holds most of the GPU until it is torn down: call `close()` (or use the generator as a context manager)
before building the next one in the same process, or the next engine's free-memory check fails.

Colocated mode (`colocate=True`, PPO rollouts under `accelerate launch`), as TRL's GRPO `vllm_mode="colocate"`: every
process builds its own engine on its own GPU beside the training model (`distributed_executor_backend=
"external_launcher"`, a small `gpu_memory_utilization`), seeded `seed + RANK`. `load_weights(policy)` copies the
trained policy into the engine before each rollout and resets its prefix cache; with `enable_sleep_mode` the engine
frees its GPU memory between rollouts. The vLLM calls are those TRL 1.16 makes (it supports vLLM 0.22-0.31), but they
are checked here only against a stand-in for vllm (tests/test_vllm_colocate.py), never against a real engine.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from prefopt.data.templates import encode_many
from prefopt.generation.base import Completion, Progress, Sampling
# what vLLM samples within, as pure checks the configs use without importing this module (or vllm)
from prefopt.generation.limits import MAX_TEMPERATURE, MIN_TEMPERATURE, temperature_problem  # noqa: F401


def checkpoint_dtype(model_path: str) -> str | None:
    """The dtype a local checkpoint was saved in (its config.json), or None (a hub id, or not recorded)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    saved = json.loads(config.read_text())
    dtype = saved.get("dtype") or saved.get("torch_dtype")  # transformers 5 writes `dtype`, 4.x `torch_dtype`
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def engine_dtype(model_path: str, dtype: str) -> str:
    """The dtype vLLM is asked for. `auto` becomes the checkpoint's saved dtype: vLLM's own `auto` downcasts a
    float32 checkpoint to bf16, while the transformers backend and evaluation's log-probs load it as saved, so
    the two backends would sample different models. A hub id keeps `auto` (vLLM then reads its config itself)."""
    if dtype != "auto":
        return dtype
    return checkpoint_dtype(model_path) or "auto"


def llm_kwargs(model_path: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
               dtype: str = "auto", seed: int = 0, colocate: bool = False, max_model_len: int | None = None,
               enable_sleep_mode: bool = False) -> dict[str, Any]:
    """Arguments of `vllm.LLM`: the engine (weights sharded over `tensor_parallel_size` GPUs, KV cache in the
    given fraction of GPU memory). `seed` seeds the engine; each request also carries its own seed.

    `colocate`: the engine lives inside this process of a distributed launch (one per process, on its GPU) instead of
    spawning workers of its own: vLLM's "external_launcher" backend joins the launcher's torch.distributed world.
    `max_model_len` caps prompt + completion (and so the KV cache vLLM must fit); `enable_sleep_mode` lets the
    engine release its GPU memory (`sleep`) while training runs. Neither is sent unless asked for."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if colocate and tensor_parallel_size != 1:
        # TRL shards a colocated engine over groups of ranks and gathers their prompts; we hold one per GPU only.
        raise ValueError(f"a colocated engine runs on its process's one GPU: tensor_parallel_size must be 1, "
                         f"got {tensor_parallel_size}")
    if max_model_len is not None and max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": dtype,
        "seed": seed,
    }
    if colocate:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if enable_sleep_mode:
        kwargs["enable_sleep_mode"] = True
    return kwargs


LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def launch_rank() -> int:
    """This process's global rank in the distributed launch a colocated engine joins. The external_launcher
    backend reads the launch from the environment (torchrun and `accelerate launch` set it); without it vLLM would
    fail deep in its start-up, so say here what is missing."""
    missing = [k for k in LAUNCH_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"a colocated vLLM engine runs in each process of a distributed launch (accelerate launch, "
                           f"torchrun), which sets {', '.join(LAUNCH_ENV)}; not set here: {', '.join(missing)}")
    return int(os.environ["RANK"])


def named_weights(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a model (or a state dict) under its checkpoint names, which is what vLLM's
    `model.load_weights` takes (it maps them onto its own fused layers itself). A DDP/accelerate wrapper is looked
    through (`.module`), and a leading `module.` (a state dict saved from one) is dropped. Parameters must be whole on
    this process: DDP replicas are; FSDP2 shards (DTensors) are gathered one at a time with `full_tensor()`, a
    collective, so every process must walk the weights in the same order (each colocated engine takes them all)."""
    while isinstance(model, torch.nn.Module) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    # named_parameters lists a tied weight once, as save_pretrained writes it; vLLM ties lm_head itself.
    pairs = model.items() if isinstance(model, Mapping) else model.named_parameters()
    for name, tensor in pairs:
        tensor = tensor.detach()  # no autograd graph into the engine's copy
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name.removeprefix("module."), tensor


def sampling_params_kwargs(sampling: Sampling) -> dict[str, Any]:
    """Arguments of `vllm.SamplingParams` for one call. Greedy (temperature 0) asks for one sequence: the n
    greedy answers are identical, and `generate` repeats it, as the transformers backend does. A temperature vLLM
    would change or reject is refused here, so a caller's log-probs are never computed at another temperature
    than the one sampled at."""
    greedy = sampling.temperature == 0
    problem = temperature_problem(sampling.temperature)
    if problem:
        raise ValueError(f"vLLM sampling temperature {problem}")
    return {
        "n": 1 if greedy else sampling.n,
        "temperature": sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "seed": sampling.seed,
    }


def to_completions(request_output, n: int, greedy: bool = False) -> list[Completion]:
    """One vLLM RequestOutput -> n Completions. `finish_reason == "stop"` means EOS was emitted (no stop strings
    are set); vLLM's token_ids keep that EOS, as Completion.token_ids does.

    Greedy requests asked for one sequence, which is repeated n times. Any other shortfall is an error: repeating
    a sample would pass one answer off as several independent ones (and make identical "preference" pairs)."""
    comps = [Completion(text=o.text, token_ids=list(o.token_ids), finished=o.finish_reason == "stop")
             for o in request_output.outputs]
    asked = 1 if greedy else n
    if len(comps) != asked:
        raise RuntimeError(f"vLLM returned {len(comps)} outputs for request "
                           f"{getattr(request_output, 'request_id', '?')}, which asked for {asked}")
    if greedy:
        comps = [Completion(comps[0].text, list(comps[0].token_ids), comps[0].finished) for _ in range(n)]
    return comps


BATCH_INVARIANT_ENV = "VLLM_BATCH_INVARIANT"


def requests_for(prompt_ids: list[list[int]], samplings: list[Sampling], params_cls) -> tuple[list, list]:
    """(requests, per-request SamplingParams) for every (sampling, prompt) pair, sampling-major: one
    `LLM.generate` call for a shard sampled under several seeds (the SimPO recipe's five), so the engine schedules
    prompts x seeds at once instead of one underfed call per seed."""
    requests, params = [], []
    for s in samplings:
        p = params_cls(**sampling_params_kwargs(s))
        requests += [{"prompt_token_ids": ids} for ids in prompt_ids]
        params += [p] * len(prompt_ids)
    return requests, params


class VLLMGenerator:
    name = "vllm"

    def __init__(self, model_path: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 dtype: str = "auto", seed: int = 0, batch_invariant: bool = False, colocate: bool = False,
                 max_model_len: int | None = None, enable_sleep_mode: bool = False):
        if colocate:
            # Every process would otherwise seed its engine alike; a request without its own seed would then draw the
            # same tokens on every GPU. (A request's own seed takes precedence, so callers vary those per rank too.)
            seed = seed + launch_rank()
        if batch_invariant:  # read by vllm when it builds its kernels: must be set before the import
            os.environ[BATCH_INVARIANT_ENV] = "1"
        import vllm  # only here: the package never needs vllm unless this backend is chosen

        # "Same seed, same candidates" holds across batch sizes and request orders only in vLLM's batch-invariant
        # mode (its docs: beta, compute capability >= 8.0); recorded with the candidates either way.
        self.batch_invariant = os.environ.get(BATCH_INVARIANT_ENV) == "1"
        self._vllm = vllm
        self.path = str(model_path)
        self.dtype = engine_dtype(self.path, dtype)  # what the engine runs in, for callers to record
        self.seed, self.colocate = seed, colocate
        self.llm = vllm.LLM(**llm_kwargs(model_path, tensor_parallel_size, gpu_memory_utilization, self.dtype, seed,
                                         colocate=colocate, max_model_len=max_model_len,
                                         enable_sleep_mode=enable_sleep_mode))
        # Colocated with sleep mode, the engine sleeps whenever it is not sampling, so training gets the GPU back.
        # Level 2 discards the weights (no CPU copy), so they must be pushed again (load_weights) before sampling.
        self._sleeps = colocate and enable_sleep_mode
        self._weights_loaded = True
        if self._sleeps:
            self.llm.sleep(level=2)
            self._weights_loaded = False

    def load_weights(self, model: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Copy a model in memory (the policy being trained, possibly DDP-wrapped) into the engine, then drop the
        engine's prefix cache: its KV blocks were computed by the old weights and would otherwise be reused for
        prompts seen before, sampling from a mix of old and new policy."""
        if self.llm is None:
            raise RuntimeError(f"VLLMGenerator for {self.path} was closed; cannot load weights into it")
        if self._sleeps:
            self.llm.wake_up(tags=["weights"])  # map the weight memory back before writing into it
        # The engine's model, in this process (external_launcher runs no worker processes), as TRL 1.16 reaches it.
        # Its load_weights takes checkpoint names and fuses q/k/v and gate/up itself.
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights(named_weights(model))
        self._weights_loaded = True
        # vLLM returns False when blocks are still in use; None from an older one that reported nothing.
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM could not reset its prefix cache after loading new weights (requests still "
                               "running?): samples would reuse KV blocks computed by the old weights")
        if self._sleeps:
            self.llm.wake_up(tags=["kv_cache"])  # awake until release(): a rollout may take several generate calls

    def release(self) -> None:
        """After a rollout (all its generate calls): with sleep mode, give the GPU back to training. Level 2 drops
        the weights too, so the next rollout must start with load_weights. A no-op otherwise."""
        if self._sleeps and self._weights_loaded and self.llm is not None:
            self.llm.sleep(level=2)
            self._weights_loaded = False

    def generate(self, prompts: list[str], sampling: Sampling, progress: Progress = None) -> list[list[Completion]]:
        return self.generate_many(prompts, [sampling], progress)[0]

    def generate_many(self, prompts: list[str], samplings: list[Sampling],
                      progress: Progress = None) -> list[list[list[Completion]]]:
        """`generate` under each sampling (e.g. one per seed) in ONE engine call: result[k][i] is prompt i's
        completions under samplings[k]."""
        if self.llm is None:
            raise RuntimeError(f"VLLMGenerator for {self.path} was closed")
        if not self._weights_loaded:
            raise RuntimeError("this colocated engine sleeps with its weights discarded between rollouts: call "
                               "load_weights(policy) before each rollout's generate calls")
        # Token ids, not text: vLLM would tokenize text with special tokens on, and a chat template that writes
        # BOS (Llama-3, Gemma-2) would then start with two. `encode` is what every other stage uses, so vLLM's
        # samples continue the very ids that evaluation and PPO score. (A dict is vLLM's TokensPrompt.)
        tok = self.llm.get_tokenizer()
        ids = encode_many(prompts, tok)
        requests, params = requests_for(ids, samplings, self._vllm.SamplingParams)
        # vLLM schedules all requests itself (continuous batching): one call, its own progress bar.
        outputs = self.llm.generate(requests, params, use_tqdm=progress is None)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} request outputs for {len(requests)} requests")
        result = []
        for k, s in enumerate(samplings):
            part = outputs[k * len(prompts):(k + 1) * len(prompts)]
            result.append([to_completions(o, s.n, greedy=s.temperature == 0) for o in part])
        if progress is not None:
            progress(len(prompts) * len(samplings),
                     sum(len(c.token_ids) for res in result for comps in res for c in comps))
        return result

    def close(self) -> None:
        """Free the engine's GPU memory so another engine can start in this process. Deleting the LLM alone
        leaves memory held (vLLM issue #23793); the maintainers' recipe is sleep, delete, then
        `cleanup_dist_env_and_memory`. Safe to call twice."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        if hasattr(llm, "sleep"):
            try:
                llm.sleep(level=2)  # drops weights and KV cache; level 2 keeps no CPU copy, we never wake it
            except Exception:  # sleep mode needs `enable_sleep_mode` at build time; the steps below still free
                pass
        del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:  # a vLLM without it (or a stand-in): the delete above is all there is
            cleanup_dist_env_and_memory = None
        if cleanup_dist_env_and_memory is not None:
            cleanup_dist_env_and_memory()
        if torch.cuda.is_available():  # what the engine's allocator cached, back to the next stage's model
            torch.cuda.empty_cache()

    def __enter__(self) -> "VLLMGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
