"""The colocated vLLM engine for PPO rollouts (one engine per `accelerate launch` process), against a stand-in for
the vllm module: what the engine is built with, its per-rank seed, and the trained policy's weights pushed into it
(with the prefix cache reset after). No real engine runs here (no GPU): vLLM's own behaviour is not under test."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import transformers

from prefopt.generation import Sampling
from prefopt.generation.vllm_backend import VLLMGenerator, llm_kwargs, named_weights

LAUNCH = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}

# A Llama's checkpoint names, as save_pretrained writes them and vLLM's LlamaForCausalLM.load_weights reads them.
LLAMA_NAMES = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
    f"model.layers.0.{m}.weight" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}


def _stand_in_vllm(calls: dict) -> types.ModuleType:
    """A vllm module whose LLM records how it was built and, in `calls["events"]`, what was done to it in order.
    The engine's model sits where a colocated (external_launcher) engine keeps it in vLLM 0.31:
    llm.llm_engine.model_executor.driver_worker.model_runner.model."""
    mod = types.ModuleType("vllm")
    events = calls.setdefault("events", [])

    class EngineModel:
        def load_weights(self, weights):
            # vLLM consumes the iterable as it loads; keep copies of what it was handed at that moment
            calls.setdefault("loads", []).append([(name, t.clone()) for name, t in weights])
            events.append("load_weights")

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw
            runner = types.SimpleNamespace(model=EngineModel())
            self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=runner)))

        def reset_prefix_cache(self):
            events.append("reset_prefix_cache")
            return calls.get("reset_ok", True)

        def sleep(self, level=1):
            events.append(f"sleep({level})")

        def wake_up(self, tags=None):
            events.append(f"wake_up({','.join(tags)})")

        def get_tokenizer(self):
            return lambda text, add_special_tokens=True: {"input_ids": [1, len(text)]}

        def generate(self, prompts, params, use_tqdm=True):
            events.append("generate")
            return [types.SimpleNamespace(request_id=str(i), outputs=[
                types.SimpleNamespace(text="x", token_ids=[7], finish_reason="stop")]) for i in range(len(prompts))]

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


@pytest.fixture
def calls(monkeypatch) -> dict:
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _stand_in_vllm(calls))
    return calls


@pytest.fixture
def launched(monkeypatch):
    """This process as rank 0 of a 4-process launch (the variables torchrun / accelerate launch set)."""
    for k, v in LAUNCH.items():
        monkeypatch.setenv(k, v)


def _tiny_llama() -> transformers.LlamaForCausalLM:
    transformers.set_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


class _DDPLike(torch.nn.Module):
    """What DDP / accelerate's prepare wraps a model in: the model is `.module`, its names gain `module.`."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


# ------------------------------------------------------------------------------------------------ building the engine


def test_colocated_engine_kwargs(calls, launched, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    VLLMGenerator("/m", gpu_memory_utilization=0.3, seed=5, colocate=True, max_model_len=1024)
    assert calls["llm"] == {"model": "/m", "tensor_parallel_size": 1, "gpu_memory_utilization": 0.3, "dtype": "auto",
                            "seed": 7, "distributed_executor_backend": "external_launcher", "max_model_len": 1024}
    assert calls["events"] == []  # no sleep mode asked: the engine stays awake
    # not colocated: exactly the engine built before (no launcher backend, no rank in the seed)
    VLLMGenerator("/m", seed=5)
    assert calls["llm"] == {"model": "/m", "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "dtype": "auto",
                            "seed": 5}
    assert llm_kwargs("/m", enable_sleep_mode=True)["enable_sleep_mode"] is True
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1"):
        llm_kwargs("/m", tensor_parallel_size=2, colocate=True)
    with pytest.raises(ValueError, match="max_model_len"):
        llm_kwargs("/m", max_model_len=0)


def test_colocated_seed_is_per_rank(calls, launched, monkeypatch):
    seeds = []
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        seeds.append(VLLMGenerator("/m", seed=11, colocate=True).seed)
        assert calls["llm"]["seed"] == seeds[-1]
    assert seeds == [11, 12, 13, 14]


def test_colocated_outside_a_launch_says_what_is_missing(calls, monkeypatch):
    for k in LAUNCH:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="accelerate launch.*not set here: LOCAL_RANK, WORLD_SIZE"):
        VLLMGenerator("/m", colocate=True)
    assert "llm" not in calls  # refused before any engine was built
    assert VLLMGenerator("/m", seed=3).seed == 3  # a standalone engine needs no launch


# ------------------------------------------------------------------------------------------------ weights


def test_named_weights_are_checkpoint_names_and_values():
    model = _tiny_llama()
    pairs = list(named_weights(model))
    assert {n for n, _ in pairs} == LLAMA_NAMES and len(pairs) == len(LLAMA_NAMES)
    state = model.state_dict()
    for name, t in pairs:
        assert torch.equal(t, state[name]), name
        assert not t.requires_grad  # detached: no autograd graph handed to the engine
    # a DDP-style wrapper is looked through, and a state dict saved from one loses its `module.` prefix
    assert [n for n, _ in named_weights(_DDPLike(model))] == [n for n, _ in pairs]
    assert [n for n, _ in named_weights(_DDPLike(_DDPLike(model)))] == [n for n, _ in pairs]  # wrapped twice
    ddp_state = _DDPLike(model).state_dict()
    assert all(k.startswith("module.") for k in ddp_state)
    assert {n for n, _ in named_weights(ddp_state)} == LLAMA_NAMES


def test_named_weights_gathers_fsdp2_shards(tmp_path):
    """Under FSDP2 each parameter is a DTensor holding this process's shard: the engine gets whole tensors under
    the checkpoint names (a one-process gloo group here; with N processes full_tensor() is the all-gather)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _tiny_llama()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "DTensor"
        pairs = list(named_weights(model))
        assert {n for n, _ in pairs} == LLAMA_NAMES
        for name, t in pairs:
            assert type(t) is torch.Tensor and torch.equal(t, want[name]), name
    finally:
        dist.destroy_process_group()


def test_load_weights_hands_every_parameter_then_resets_prefix_cache(calls, launched):
    g = VLLMGenerator("/m", gpu_memory_utilization=0.3, colocate=True)
    model = _tiny_llama()
    g.load_weights(model)
    assert calls["events"] == ["load_weights", "reset_prefix_cache"]
    (loaded,) = calls["loads"]
    assert {n for n, _ in loaded} == LLAMA_NAMES and len(loaded) == len(LLAMA_NAMES)
    state = model.state_dict()
    for name, t in loaded:
        assert torch.equal(t, state[name]), name
    # a training step later, through the DDP wrapper: the engine gets the new values, and the cache is reset again
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    g.load_weights(_DDPLike(model))
    assert calls["events"] == ["load_weights", "reset_prefix_cache"] * 2
    second = dict(calls["loads"][1])
    assert set(second) == LLAMA_NAMES
    assert torch.equal(second["lm_head.weight"], dict(loaded)["lm_head.weight"] + 1.0)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in second.items())


def test_load_weights_refuses_a_cache_it_could_not_reset(calls, launched):
    calls["reset_ok"] = False
    g = VLLMGenerator("/m", colocate=True)
    with pytest.raises(RuntimeError, match="could not reset its prefix cache"):
        g.load_weights(_tiny_llama())


def test_load_weights_into_a_closed_generator(calls, launched):
    g = VLLMGenerator("/m", colocate=True)
    g.close()
    with pytest.raises(RuntimeError, match="was closed; cannot load weights"):
        g.load_weights(_tiny_llama())
    assert "loads" not in calls


def test_sleep_mode_frees_the_gpu_between_rollouts(calls, launched):
    """Colocated with sleep mode, the engine sleeps (level 2: weights discarded) except during a rollout: load_weights
    wakes and fills the weights and wakes the KV cache, every generate call of the rollout runs, release() puts it to
    sleep again, and sampling without a push is refused."""
    g = VLLMGenerator("/m", colocate=True, enable_sleep_mode=True)
    assert calls["llm"]["enable_sleep_mode"] is True
    assert calls["events"] == ["sleep(2)"]
    s = Sampling(n=1, temperature=1.0, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="call load_weights"):
        g.generate(["a"], s)
    for _ in range(2):  # two PPO iterations, each sampling its rollout in two chunks (ppo.generation_chunk)
        del calls["events"][:]
        g.load_weights(_tiny_llama())
        assert [c.text for c in g.generate(["a", "b"], s)[0]] == ["x"]
        assert [c.text for c in g.generate(["c", "d"], s)[0]] == ["x"]
        g.release()
        g.release()  # twice: still one sleep
        assert calls["events"] == ["wake_up(weights)", "load_weights", "reset_prefix_cache",
                                   "wake_up(kv_cache)", "generate", "generate", "sleep(2)"]
    with pytest.raises(RuntimeError, match="call load_weights"):
        g.generate(["a"], s)
