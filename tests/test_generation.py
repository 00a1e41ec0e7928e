"""Generation: the transformers backend on the tiny model, the vLLM request building (no GPU here), backend
choice, and the `generate` stage's shards, resume and SimPO recipe."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch

from prefopt.generation import Sampling, make_generator, resolve_backend
from prefopt.generation import factory
from prefopt.generation.base import generate_many
from prefopt.data.templates import encode_many
from prefopt.generation.hf import TransformersGenerator, left_pad
from prefopt.generate.recipe import all_identical, unique_prompts
from prefopt.generation.vllm_backend import VLLMGenerator, llm_kwargs, sampling_params_kwargs, to_completions
from prefopt.models.loading import load_causal_lm, load_tokenizer
from prefopt.io import read_jsonl, weights_sha256

PROMPTS = ["### Instruction:\nSort 3 1 2\n\n### Response:\n", "hi", "The quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return TransformersGenerator(str(tiny_model_dir), batch_size=2)


@pytest.fixture(scope="module")
def sharp_gen(tiny_model_dir):
    """The tiny model with weights scaled up: its greedy answers vary from prompt to prompt (the plain random
    init repeats one token), so a padding bug shows in the output."""
    model = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    return TransformersGenerator(model, load_tokenizer(str(tiny_model_dir)), batch_size=8)


# ------------------------------------------------------------------------------------------------ transformers


def test_left_pad_shapes():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_completions_shapes_eos_and_padding(tiny_model_dir):
    """n completions per prompt; token_ids end at the first EOS (kept) or run to max_new_tokens; no padding.
    The EOS embedding (tied to the output head) is scaled up so that some samples end early."""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        model.get_output_embeddings().weight[tok.eos_token_id] *= 40
    model.train()
    g = TransformersGenerator(model, tok, batch_size=2)
    outs = g.generate(PROMPTS, Sampling(n=4, temperature=1.0, max_new_tokens=8, seed=3))
    assert model.training, "generation must put the model back in the mode it was in"
    assert [len(o) for o in outs] == [4, 4, 4]
    comps = [c for o in outs for c in o]
    assert any(c.finished for c in comps) and any(not c.finished for c in comps)
    for c in comps:
        assert 1 <= len(c.token_ids) <= 8
        assert c.token_ids.count(tok.eos_token_id) == (1 if c.finished else 0)
        if c.finished:
            assert c.token_ids[-1] == tok.eos_token_id
        else:
            assert len(c.token_ids) == 8
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_same_seed_same_candidates(gen):
    s = Sampling(n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=7)
    first = gen.generate(PROMPTS, s)
    torch.rand(100)  # whatever ran before must not matter
    state = torch.get_rng_state()
    again = gen.generate(PROMPTS, s)
    assert torch.equal(state, torch.get_rng_state()), "generation must not move the caller's RNG"
    assert [[c.token_ids for c in o] for o in again] == [[c.token_ids for c in o] for o in first]
    other = gen.generate(PROMPTS, Sampling(n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=8))
    assert [[c.token_ids for c in o] for o in other] != [[c.token_ids for c in o] for o in first]
    # n samples of one prompt are distinct draws, not copies
    assert len({tuple(c.token_ids) for c in first[2]}) > 1


def test_left_padding_batched_equals_alone(sharp_gen):
    long = "Below is an instruction that describes a task. Write a response that appropriately completes it. " * 2
    short = ["Sort 3 1 2", "hi", "The quick brown fox"]
    s = Sampling(n=1, temperature=0, max_new_tokens=12)
    batched = sharp_gen.generate([long] + short, s)
    for i, p in enumerate(short):
        alone = sharp_gen.generate([p], s)[0][0].token_ids
        assert batched[i + 1][0].token_ids == alone, p
    assert len({tuple(b[0].token_ids) for b in batched}) == 4  # the outputs really differ between prompts


def test_greedy_repeats_one_answer(gen):
    outs = gen.generate(PROMPTS[:2], Sampling(n=3, temperature=0, max_new_tokens=5))
    for o in outs:
        assert len(o) == 3 and o[0].token_ids == o[1].token_ids == o[2].token_ids
        assert o[0] is not o[1]


# ------------------------------------------------------------------------------------------------ vLLM and backend choice


@pytest.mark.parametrize("family", ["llama3", "gemma2", "qwen2.5", "mistral", "phi3", "gemma3"])
def test_preallocated_cache_samples_what_transformers_own_cache_samples(family):
    """The transformers backend's KV cache (generation.kvcache) is filled in place instead of regrown by
    `torch.cat` each step: the same values in the same order, so every family samples the same tokens to the bit,
    its sliding-window and soft-capped layers included; without it (the patched factory) the old path runs (and
    with it, transformers' num_return_sequences: the prompt computed n times)."""
    from families import FAMILIES, build_model, build_tokenizer
    from prefopt.generation import hf

    fam = FAMILIES[family]
    tok = build_tokenizer(fam)
    model = build_model(fam, tok, attn=fam.attn[-1], hidden_size=64)
    with torch.no_grad():  # sharper weights: samples that differ from row to row, so a stale cache would show
        for p in model.parameters():  # (Gemma at init repeats one token: its weights are scaled down instead)
            p.mul_(0.5 if family.startswith("gemma") else 4)
    prompts = ["The quick brown fox", "Sort the numbers 3 1 2", "Hello", "system user assistant " * 6]
    sampling = Sampling(n=3, temperature=1.0, max_new_tokens=40, seed=5)  # past gemma/qwen's window of 16
    ours = TransformersGenerator(model, tok, batch_size=4, share_prompts=False).generate(prompts, sampling)
    real = hf.preallocated_cache
    try:
        hf.preallocated_cache = lambda model, capacity: None  # generate's own DynamicCache
        theirs = TransformersGenerator(model, tok, batch_size=4).generate(prompts, sampling)
    finally:
        hf.preallocated_cache = real
    assert [[c.token_ids for c in cs] for cs in ours] == [[c.token_ids for c in cs] for cs in theirs]
    assert len({tuple(c.token_ids) for cs in ours for c in cs}) > 6


@pytest.mark.parametrize("path", ["tree_prefill", "shared_prefill"])
@pytest.mark.parametrize("family", ["llama3", "gemma2", "qwen2.5", "mistral", "phi3", "gemma3"])
def test_prefill_samples_what_transformers_own_prefill_samples(family, path, monkeypatch):
    """The prompts' shared tokens computed once (generation.prefill: the batch's prompts as one prefix tree read by
    varlen attention, or, for an attention that cannot read one, the B prompts once for their B * n rows): every
    family samples the tokens transformers' own prefill (each prompt n times) samples, with prompts of different
    lengths (left padding), two that share a start, and one longer than the sliding window of 16. The prefill
    really ran (once per batch), and the tree computed each shared token once."""
    from families import FAMILIES, build_model, build_tokenizer
    from prefopt.generation import prefill

    fam = FAMILIES[family]
    tok = build_tokenizer(fam)
    model = build_model(fam, tok, attn=fam.attn[-1], hidden_size=64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5 if family.startswith("gemma") else 4)
    prompts = ["The quick brown fox", "Sort the numbers 3 1 2", "Sort the numbers 9 8", "Hello",
               "system user assistant " * 6]
    sampling = Sampling(n=3, temperature=1.0, max_new_tokens=20, seed=11)
    calls = []
    real = getattr(prefill, path)
    monkeypatch.setattr(prefill, "can_tree", lambda model: path == "tree_prefill")
    monkeypatch.setattr(prefill, path, lambda model, cache, ids, am, n: (
        calls.append(tuple(ids.shape)), real(model, cache, ids, am, n))[1])
    positions = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: positions.append(kwargs["input_ids"].numel()), with_kwargs=True)
    ours = TransformersGenerator(model, tok, batch_size=5).generate(prompts, sampling)
    handle.remove()
    assert len(calls) == 1 and calls[0][0] == 5
    heads = [ids[:-1] for ids in encode_many(prompts, tok)]  # each prompt but its last token
    trie = {tuple(h[:k]) for h in heads for k in range(1, len(h) + 1)}  # a token per distinct prefix
    assert positions[0] == (len(trie) if path == "tree_prefill" else 5 * max(len(h) for h in heads))
    assert len(trie) < sum(len(h) for h in heads) - 2  # the two "Sort the numbers" prompts share a start
    own = TransformersGenerator(model, tok, batch_size=5, share_prompts=False).generate(prompts, sampling)
    assert len(calls) == 1
    assert [[c.token_ids for c in cs] for cs in ours] == [[c.token_ids for c in cs] for cs in own]
    assert len({tuple(c.token_ids) for cs in ours for c in cs}) > 8


def test_preallocated_layer_copes_with_a_cache_changed_under_it():
    """A layer whose keys transformers replaced (crop, reorder, reset) starts a new buffer from them, and one
    whose capacity runs out grows: the returned keys are always the concatenation."""
    from prefopt.generation.kvcache import preallocated_cache
    from transformers import LlamaConfig

    cache = preallocated_cache(types.SimpleNamespace(config=LlamaConfig(num_hidden_layers=1)), capacity=4)
    layer, steps = cache.layers[0], [torch.randn(2, 3, m, 5) for m in (3, 1, 2)]
    k, _ = layer.update(steps[0], steps[0] + 1)
    assert torch.equal(k, steps[0]) and layer._buffers[0].shape[-2] == 4
    k, v = layer.update(steps[1], steps[1] + 1)
    assert torch.equal(k, torch.cat(steps[:2], -2)) and torch.equal(v, torch.cat(steps[:2], -2) + 1)
    layer.keys, layer.values = layer.keys[..., :2, :].clone(), layer.values[..., :2, :].clone()  # a crop to 2
    k, v = layer.update(steps[2], steps[2] + 1)  # 2 + 2 fits the old buffer, but the keys are not its view:
    assert torch.equal(k, torch.cat([steps[0][..., :2, :], steps[2]], -2))  # a new one, twice what it holds
    assert layer._buffers[0].shape[-2] == 8
    k, _ = layer.update(steps[1], steps[1])  # past the planned 4 positions, into the room the rebuild left
    assert k.shape[-2] == 5 and torch.equal(k[..., :4, :], torch.cat([steps[0][..., :2, :], steps[2]], -2))
    assert torch.equal(k[..., 4:, :], steps[1]) and layer._buffers[0].shape[-2] == 8


def test_vllm_request_for_simpo_recipe():
    s = Sampling(n=1, temperature=0.8, top_p=0.95, max_new_tokens=2048, seed=13)
    assert sampling_params_kwargs(s) == {"n": 1, "temperature": 0.8, "top_p": 0.95, "max_tokens": 2048, "seed": 13}
    assert sampling_params_kwargs(Sampling(n=5, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=0))["n"] == 5
    # greedy asks for one sequence (then repeated), with nucleus sampling off
    assert sampling_params_kwargs(Sampling(n=4, temperature=0, top_p=0.9))["n"] == 1
    assert llm_kwargs("/m", tensor_parallel_size=4, gpu_memory_utilization=0.85, dtype="bfloat16", seed=3) == {
        "model": "/m", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.85, "dtype": "bfloat16", "seed": 3}
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        llm_kwargs("/m", tensor_parallel_size=0)


class _TextTokenizer:
    """A stand-in tokenizer: BOS then the text itself as one "token", so the fake engine can echo prompts."""

    bos_token = "<s>"

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, list):  # a batch, as a real tokenizer takes it (`encode_many`)
            return {"input_ids": [self(t, add_special_tokens)["input_ids"] for t in text]}
        return {"input_ids": (["<s>"] if add_special_tokens else []) + [text]}


def _fake_vllm(calls, short: int = 0):
    """A stand-in for the vllm module that records what it is asked and returns RequestOutput-shaped objects;
    the first request gets `short` fewer outputs than asked (as a misbehaving engine might return)."""
    mod = types.ModuleType("vllm")

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

        def get_tokenizer(self):
            return calls.get("tokenizer") or _TextTokenizer()

        def generate(self, prompts, params, use_tqdm=True):
            # vLLM takes one SamplingParams for all requests or a list with one per request
            per = params if isinstance(params, list) else [params] * len(prompts)
            assert len(per) == len(prompts)
            calls["generate_calls"] = calls.get("generate_calls", 0) + 1
            calls["prompts"], calls["params"] = prompts, per[0].kw
            calls["all_params"] = [p.kw for p in per]
            out = []
            for i, (p, sp) in enumerate(zip(prompts, per)):
                text = p["prompt_token_ids"][-1]  # _TextTokenizer keeps the text as its last "id"
                n = sp.kw["n"] - (short if i == 0 else 0)
                tag = f"s{sp.kw['seed']}-" if calls.get("tag_seed") else ""
                out.append(types.SimpleNamespace(request_id=str(i), outputs=[
                    types.SimpleNamespace(text=f"{tag}{text}-{j}", token_ids=[1, j, 2],
                                          finish_reason="stop" if j else "length") for j in range(n)]))
            return out

        def sleep(self, level=1):
            calls.setdefault("teardown", []).append(f"sleep({level})")

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_vllm_generator_maps_outputs(monkeypatch):
    calls = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    g = VLLMGenerator("/m", tensor_parallel_size=2, seed=5)
    assert calls["llm"]["tensor_parallel_size"] == 2 and calls["llm"]["model"] == "/m"
    outs = g.generate(["a", "b"], Sampling(n=2, temperature=0.8, top_p=0.95, max_new_tokens=9, seed=13))
    assert calls["params"] == {"n": 2, "temperature": 0.8, "top_p": 0.95, "max_tokens": 9, "seed": 13}
    assert [[c.text for c in o] for o in outs] == [["a-0", "a-1"], ["b-0", "b-1"]]
    assert [c.finished for c in outs[0]] == [False, True]  # "length" -> cut, "stop" -> EOS
    greedy = g.generate(["a"], Sampling(n=3, temperature=0))
    assert [c.text for c in greedy[0]] == ["a-0"] * 3
    assert calls["params"]["n"] == 1  # greedy asks for one sequence, then repeats it
    assert calls["llm"]["dtype"] == "auto" == g.dtype  # "/m" has no config.json: vLLM reads the hub config itself


def test_vllm_samples_every_seed_in_one_call(monkeypatch):
    """The SimPO recipe's one-sample-per-seed shard: prompts x seeds go to the engine in one `generate` call with
    one SamplingParams per request (sampling-major), and come back split per seed."""
    calls = {"tag_seed": True}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    g = VLLMGenerator("/m")
    samplings = [Sampling(n=1, temperature=0.8, top_p=0.95, max_new_tokens=7, seed=s) for s in (13, 21, 42)]
    seen = []
    outs = generate_many(g, ["a", "b"], samplings, progress=lambda done, tokens: seen.append((done, tokens)))
    assert calls["generate_calls"] == 1
    assert [p["seed"] for p in calls["all_params"]] == [13, 13, 21, 21, 42, 42]
    assert [p["prompt_token_ids"][-1] for p in calls["prompts"]] == ["a", "b"] * 3
    assert [[o[0].text for o in per_seed] for per_seed in outs] == [["s13-a-0", "s13-b-0"], ["s21-a-0", "s21-b-0"],
                                                                   ["s42-a-0", "s42-b-0"]]
    assert seen == [(6, 18)]  # 6 (prompt, seed) requests, 3 tokens each
    assert g.generate(["a"], samplings[1])[0][0].text == "s21-a-0"  # generate is generate_many with one sampling


def test_generate_many_loops_for_a_backend_without_it():
    class OneAtATime:
        def generate(self, prompts, sampling, progress=None):
            return [[f"{p}@{sampling.seed}"] for p in prompts]

    assert generate_many(OneAtATime(), ["a", "b"], [Sampling(seed=1), Sampling(seed=2)]) == [
        [["a@1"], ["b@1"]], [["a@2"], ["b@2"]]]


def test_vllm_batch_invariant_mode_is_set_before_import_and_recorded(monkeypatch):
    calls = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    assert VLLMGenerator("/m").batch_invariant is False
    g = VLLMGenerator("/m", batch_invariant=True)
    assert g.batch_invariant is True and os.environ["VLLM_BATCH_INVARIANT"] == "1"


def test_vllm_gets_token_ids_with_one_bos(monkeypatch, tiny_model_dir):
    """Prompts reach vLLM as token ids made by `encode`: a prompt text that already starts with BOS (a chat
    template that writes it) gets no second one, and a plain Alpaca prompt gets the tokenizer's."""
    from prefopt.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    calls = {"tokenizer": tok}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    g = VLLMGenerator("/m")
    g.generate([tok.bos_token + "Human: hi", "Human: hi"], Sampling(n=1, temperature=1.0))
    a, b = (r["prompt_token_ids"] for r in calls["prompts"])
    assert a == b and a[0] == tok.bos_token_id and a.count(tok.bos_token_id) == 1


def test_vllm_fewer_outputs_than_asked_is_an_error(monkeypatch):
    """A request that comes back with fewer samples than asked is refused, never padded with copies."""
    calls = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls, short=1))
    g = VLLMGenerator("/m")
    with pytest.raises(RuntimeError, match="vLLM returned 1 outputs for request 0, which asked for 2"):
        g.generate(["a", "b"], Sampling(n=2, temperature=1.0))
    with pytest.raises(RuntimeError, match="returned 0 outputs for request 0, which asked for 1"):
        g.generate(["a"], Sampling(n=4, temperature=0))  # greedy: one asked, none came
    with pytest.raises(RuntimeError, match="returned 0 outputs for request"):
        to_completions(types.SimpleNamespace(outputs=[]), 1)


def test_vllm_dtype_is_the_checkpoints_not_vllms_auto(monkeypatch, tiny_model_dir, tmp_path):
    """`auto` is resolved to the dtype the checkpoint was saved in (vLLM's own auto would run an fp32 checkpoint
    in bf16 while transformers and the evaluation log-probs use fp32); an explicit dtype is passed as given."""
    calls = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    assert VLLMGenerator(str(tiny_model_dir)).dtype == "float32" == calls["llm"]["dtype"]
    assert VLLMGenerator(str(tiny_model_dir), dtype="bfloat16").dtype == "bfloat16" == calls["llm"]["dtype"]
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))  # as transformers 4.x saves
    assert VLLMGenerator(str(tmp_path)).dtype == "bfloat16"


def test_vllm_close_sleeps_deletes_and_cleans_up(monkeypatch):
    """close() follows vLLM's teardown (issue #23793): sleep, delete, cleanup_dist_env_and_memory; twice is fine,
    and a closed generator refuses to generate."""
    calls = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    dist, parallel_state = types.ModuleType("vllm.distributed"), types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.cleanup_dist_env_and_memory = lambda: calls["teardown"].append("cleanup")
    monkeypatch.setitem(sys.modules, "vllm.distributed", dist)
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", parallel_state)
    with VLLMGenerator("/m") as g:
        g.generate(["a"], Sampling(n=1))
    assert calls["teardown"] == ["sleep(2)", "cleanup"] and g.llm is None
    g.close()
    assert calls["teardown"] == ["sleep(2)", "cleanup"]
    with pytest.raises(RuntimeError, match="was closed"):
        g.generate(["a"], Sampling(n=1))
    # a vLLM without cleanup_dist_env_and_memory: close() still deletes the engine
    monkeypatch.delitem(sys.modules, "vllm.distributed.parallel_state")
    monkeypatch.delitem(sys.modules, "vllm.distributed")
    g = VLLMGenerator("/m")
    g.close()
    assert g.llm is None and calls["teardown"][-1] == "sleep(2)"


@pytest.mark.parametrize("temperature", [0.005, 2.5, 1e-6])
def test_vllm_request_refuses_temperatures_vllm_would_change(temperature):
    with pytest.raises(ValueError, match=r"must be 0 \(greedy\) or in \[0\.01, 2\]"):
        sampling_params_kwargs(Sampling(temperature=temperature))


def test_auto_picks_transformers_here(monkeypatch):
    assert resolve_backend("transformers") == "transformers"
    assert resolve_backend("auto") == "transformers"  # no vllm, no CUDA on this machine
    monkeypatch.setattr(factory, "vllm_unavailable_reason", lambda: None)
    assert resolve_backend("auto") == "vllm"


def test_clear_error_when_vllm_cannot_run(tiny_model_dir, monkeypatch):
    with pytest.raises(ValueError) as e:
        make_generator(str(tiny_model_dir), backend="vllm")
    msg = str(e.value)
    assert "not installed" in msg and "pip install -e .[vllm]" in msg and "backend: transformers" in msg
    # installed but no GPU: says so
    monkeypatch.setattr(factory.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_backend("vllm")
    with pytest.raises(ValueError, match="unknown generation backend"):
        resolve_backend("hf")


# ------------------------------------------------------------------------------------------------ the stage


def _experiment(tmp_path, tiny_model_dir, out="runs", **generate):
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig

    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        rows = [{"instruction": f"Sort the numbers {i} {i + 3} {i + 1}.", "input": "" if i % 2 else "ascending"}
                for i in range(5)]
        rows.append(dict(rows[0]))  # the same prompt twice: one row, counted
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = {"model": str(tiny_model_dir), "prompts": {"path": str(prompts)}, "backend": "transformers",
               "n": 2, "max_new_tokens": 4, "shard_size": 2, "batch_size": 2, **generate}
    return from_dict(ExperimentConfig, {"name": "t", "output_dir": str(tmp_path / out), "wandb": {"mode": "disabled"},
                                        "generate": section})


def _rows(d):
    return [r for p in sorted(d.glob("shard-*.jsonl")) for r in read_jsonl(p)]


def test_stage_killed_then_resumed(tmp_path, tiny_model_dir, monkeypatch):
    """Killed after the first shard: the rerun keeps that shard as it is and writes exactly the rest; the result
    equals an uninterrupted run's."""
    import prefopt.generate.recipe as recipe
    from prefopt.stage import run_stage

    cfg = _experiment(tmp_path, tiny_model_dir)
    real_write, written = recipe.write_jsonl, []

    def write_then_die(path, rows):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(path)
        return real_write(path, rows)

    monkeypatch.setattr(recipe, "write_jsonl", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "generate")
    monkeypatch.setattr(recipe, "write_jsonl", real_write)
    d = tmp_path / "runs" / "t" / "generate"
    first = d / "shard-00000.jsonl"
    assert [p.name for p in d.glob("shard-*.jsonl")] == ["shard-00000.jsonl"]
    before = (first.read_bytes(), first.stat().st_mtime_ns)

    summary = run_stage(cfg, "generate")
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    assert summary["resumed_shards"] == 1 and summary["shards"] == 3
    rows = _rows(d)
    ids = [r["prompt_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 5 and summary["duplicate_prompts"] == 1
    assert summary["candidates"] == 10 == sum(len(r["candidates"]) for r in rows)
    assert summary["tokens"] == sum(sum(r["candidate_lengths"]) for r in rows)

    straight = run_stage(_experiment(tmp_path, tiny_model_dir, out="straight"), "generate")
    assert straight["resumed_shards"] == 0
    assert _rows(tmp_path / "straight" / "t" / "generate") == rows

    r = rows[0]
    assert set(r) >= {"prompt_id", "prompt", "candidates", "candidate_lengths", "finished", "sampling", "seed",
                      "generator", "meta"}
    assert r["generator"] == {"path": str(tiny_model_dir), "sha256": weights_sha256(tiny_model_dir),
                              "backend": "transformers", "batch_invariant": False}
    assert r["meta"] == {"instruction": "Sort the numbers 0 3 1.", "input": "ascending"}
    assert r["prompt"].endswith("### Input:\nascending\n\n### Response:\n")
    assert r["sampling"]["n"] == 2 and r["seed"] == 0
    assert all(1 <= n <= 4 for n in r["candidate_lengths"])


def test_stage_simpo_recipe_and_drop_identical(tmp_path, tiny_model_dir):
    """One sample per seed at T=0.8, top_p=0.95; with greedy decoding every prompt's five candidates are equal
    and all are dropped."""
    from prefopt.stage import run_stage

    simpo = dict(seeds=[13, 21, 42, 79, 100], temperature=0.8, top_p=0.95, drop_identical=True, shard_size=5)
    summary = run_stage(_experiment(tmp_path, tiny_model_dir, out="simpo", **simpo), "generate")
    rows = _rows(tmp_path / "simpo" / "t" / "generate")
    assert summary["dropped_identical"] == 5 - len(rows)
    assert all(len(r["candidates"]) == 5 for r in rows) and rows
    assert rows[0]["seed"] == [13, 21, 42, 79, 100] and len(rows[0]["sampling"]["shard_seeds"]) == 5
    assert rows[0]["sampling"]["temperature"] == 0.8 and rows[0]["sampling"]["top_p"] == 0.95

    # greedy decoding would give five copies of one answer per prompt: refused when the config is read
    from prefopt.config import ConfigError

    with pytest.raises(ConfigError, match=r"generate\.temperature: 0 is greedy .* seeds asks for 5 samples"):
        _experiment(tmp_path, tiny_model_dir, out="greedy", **{**simpo, "temperature": 0.0})


def test_stage_vllm_asked_but_cannot_run(tmp_path, tiny_model_dir):
    from prefopt.stage import run_stage

    with pytest.raises(ValueError, match="cannot run"):
        run_stage(_experiment(tmp_path, tiny_model_dir, backend="vllm"), "generate")


def test_helpers():
    assert all_identical(["a", "a"]) and not all_identical(["a", "b"]) and not all_identical(["a"])
    rows, dup = unique_prompts([{"prompt_id": "x"}, {"prompt_id": "y"}, {"prompt_id": "x"}])
    assert [r["prompt_id"] for r in rows] == ["x", "y"] and dup == 1


def test_config_validation(tmp_path, tiny_model_dir):
    from prefopt.config import ConfigError

    with pytest.raises(ConfigError, match="'seeds' must be distinct"):
        _experiment(tmp_path, tiny_model_dir, seeds=[13, 13])
    with pytest.raises(ConfigError, match=r"generate\.top_p: must be > 0 and <= 1, got 0\.0"):
        _experiment(tmp_path, tiny_model_dir, top_p=0.0)


def test_config_temperature_limits(tmp_path, tiny_model_dir):
    """Temperatures vLLM samples at as asked pass: 0 (greedy, one candidate) and [0.01, 2]. Others are refused
    with a one-line error naming the key: vLLM would raise (0, 0.01) to 0.01, reject > 2, and refuse n > 1 when
    greedy."""
    from prefopt.config import ConfigError

    for ok in (dict(temperature=0.01), dict(temperature=2.0), dict(temperature=0.0, n=1)):
        assert _experiment(tmp_path, tiny_model_dir, **ok).generate.temperature == ok["temperature"]
    for bad in (0.005, 1e-6, 2.5):
        with pytest.raises(ConfigError, match=rf"^generate\.temperature: must be 0 \(greedy\) or in \[0\.01, 2\].*"
                                              rf"got {bad}$"):
            _experiment(tmp_path, tiny_model_dir, temperature=bad)
    with pytest.raises(ConfigError, match=r"^generate\.temperature: 0 is greedy decoding, one answer per prompt, but "
                                          r"n asks for 2 samples"):
        _experiment(tmp_path, tiny_model_dir, temperature=0.0, n=2)
