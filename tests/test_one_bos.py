"""One BOS everywhere (issue 10, item 1).

Llama-3 and Gemma-2 chat templates write `{{ bos_token }}` themselves, so the rendered prompt text already starts
with BOS; a tokenizer that also adds BOS (as Llama's and ours do, in the post-processor) would give `<bos><bos>`.
Each path that turns prompt text into ids must give exactly one BOS, at the start: generation, pairs, reward
scoring (classifier and likelihood), evaluation log-probs, PPO rollouts, SFT and the judge. The tokenizers are
tiny ones built here with templates written in the manner of the real ones; Alpaca text and a ChatML template
(no BOS in the text) must keep getting the tokenizer's one BOS.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from families import FAMILIES, build_model
from families import build_tokenizer as build_family_tokenizer
from prefopt.data.templates import encode, render_prompt, special_tokens_for

# The families' own tokenizers (tests/families.py: public chat template, family special tokens, BOS added as the
# family adds it; Qwen none), plus prefopt's own ChatML tokenizer and plain Alpaca text.
FLAVOURS = list(FAMILIES) + ["chatml", "alpaca"]
# the token that ends an assistant turn in each family's template (the EOS where the template writes it)
TURN_END = {"gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi3": "<|end|>", "chatml": "<|im_end|>"}
MESSAGES = [{"role": "user", "content": "Sort the numbers in ascending order.\n\n3 1 2"}]


def make_tokenizer(flavour: str):
    from prefopt.models.loading import build_tokenizer

    if flavour in FAMILIES:
        return build_family_tokenizer(FAMILIES[flavour])
    return build_tokenizer(["Sort the numbers in ascending order. 3 1 2 -> 1 2 3"] * 20, vocab_size=300)


def make_prompt(flavour: str, tok) -> str:
    """The rendered prompt text every stage receives."""
    if flavour == "alpaca":
        from prefopt.data.templates import alpaca_prompt

        return alpaca_prompt("Sort the numbers in ascending order.", "3 1 2")
    return render_prompt(MESSAGES, tok)


def assert_one_bos(ids, tok) -> None:
    """Exactly the family's BOS at the start; for a family without one (Qwen), nothing put in front of the text:
    its first token is the template's `<|im_start|>` or an ordinary token (a left-truncated prompt, judge text)."""
    ids = [int(i) for i in ids]
    if tok.bos_token_id is None:
        first = tok.convert_ids_to_tokens(ids[0]) if ids else None
        assert first == "<|im_start|>" or ids[0] not in tok.all_special_ids, ids[:4]
        return
    assert ids and ids[0] == tok.bos_token_id, ids[:4]
    assert tok.bos_token_id not in ids[1:], f"second BOS at {ids.index(tok.bos_token_id, 1)}: {ids[:6]}"


@pytest.fixture(scope="module", params=FLAVOURS)
def setup(request, tmp_path_factory):
    """(flavour, tokenizer, saved tiny model folder, rendered prompt) for one template flavour: the family's own
    architecture for a family, a tiny Llama for prefopt's ChatML and Alpaca flavours."""
    from prefopt.models.loading import build_tiny_llama, load_tokenizer, save_model
    from prefopt.dist.process import seed_everything

    seed_everything(0)
    tok = make_tokenizer(request.param)
    if request.param in FAMILIES:
        model = build_model(FAMILIES[request.param], tok, FAMILIES[request.param].attn[-1], hidden_size=32, layers=1)
    else:
        model = build_tiny_llama(tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=32, max_position_embeddings=256)
    path = tmp_path_factory.mktemp(request.param) / "model"
    save_model(model, tok, path)
    tok = load_tokenizer(str(path))  # as every stage reads it (a family without a pad token pads with EOS)
    return SimpleNamespace(flavour=request.param, tok=tok, path=path, prompt=make_prompt(request.param, tok))


class SpyLM(torch.nn.Module):
    """Records every input_ids it is given; returns zero logits, (B, T, V) for an LM or (B, 1) for a classifier."""

    def __init__(self, vocab: int, classifier: bool = False):
        super().__init__()
        self.vocab, self.classifier, self.seen = vocab, classifier, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kw):
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.seen += [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
        B, T = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(B, 1) if self.classifier else torch.zeros(B, T, self.vocab))


# ------------------------------------------------------------------------------------------------ the helper


def test_templates_really_write_bos_so_plain_tokenization_doubles_it():
    """Without the helper these templates give `<bos><bos>`: the tests below are not vacuous."""
    for flavour in ("llama3", "gemma2"):
        tok = make_tokenizer(flavour)
        text = render_prompt(MESSAGES, tok)
        assert text.startswith(tok.bos_token)
        assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2
        assert not special_tokens_for(text, tok)
        assert encode(text, tok) == tok(text, add_special_tokens=False)["input_ids"]
        assert_one_bos(encode(text, tok), tok)


def test_text_without_bos_gets_the_tokenizers_one():
    for flavour in ("chatml", "alpaca"):
        tok = make_tokenizer(flavour)
        text = make_prompt(flavour, tok)
        assert special_tokens_for(text, tok)
        assert encode(text, tok) == tok(text)["input_ids"]  # unchanged from before the helper
        assert_one_bos(encode(text, tok), tok)


def test_tokenizer_without_bos_adds_nothing():
    """A tokenizer with no BOS (Qwen-like) is tokenized with special tokens on, as before, and gains none."""
    tok = SimpleNamespace(bos_token=None)
    assert special_tokens_for("<|im_start|>user", tok)


# ------------------------------------------------------------------------------------------------ every path


def test_generation_inputs(setup):
    from prefopt.generation.base import Sampling
    from prefopt.generation.hf import TransformersGenerator
    from prefopt.models.loading import load_causal_lm

    gen = TransformersGenerator(load_causal_lm(str(setup.path)), tokenizer=setup.tok, batch_size=2, device="cpu")
    seen = []
    real = gen.model.generate

    def spy(input_ids, attention_mask, **kw):
        seen.extend(row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask))
        return real(input_ids=input_ids, attention_mask=attention_mask, **kw)

    gen.model.generate = spy
    gen.generate([setup.prompt, setup.prompt + "x"], Sampling(n=1, temperature=1.0, max_new_tokens=2, seed=0))
    assert len(seen) == 2
    for ids in seen:
        assert_one_bos(ids, setup.tok)


def test_pairs_tokenization(setup):
    from prefopt.preference.data import tokenize_pair

    t = tokenize_pair({"prompt": setup.prompt, "chosen": "1 2 3", "rejected": "3 2 1"}, setup.tok, max_length=0)
    assert_one_bos(t["prompt_ids"], setup.tok)
    for key, answer in (("chosen_ids", "1 2 3"), ("rejected_ids", "3 2 1")):
        full = t["prompt_ids"] + t[key]
        assert_one_bos(full, setup.tok)
        assert full == encode(setup.prompt + answer + setup.tok.eos_token, setup.tok)


def test_encode_many_gives_encode_s_ids(setup):
    """The batched tokenization the scorers and pair loaders use gives each text `encode`'s ids: texts with and
    without the BOS written in (both BOS cases in one call), repeats, and truncation passed through."""
    from prefopt.data.templates import encode_many

    bos = setup.tok.bos_token or ""
    texts = [setup.prompt, setup.prompt + "1 2 3", "3 2 1", setup.prompt, bos + "1 2", "", setup.prompt + "x" * 40]
    assert encode_many(texts, setup.tok) == [encode(t, setup.tok) for t in texts]
    cut = dict(truncation=True, max_length=6)
    assert encode_many(texts, setup.tok, **cut) == [encode(t, setup.tok, **cut) for t in texts]


def test_pairs_truncated_prompt_keeps_its_one_bos(setup):
    from prefopt.preference.data import tokenize_pair

    t = tokenize_pair({"prompt": setup.prompt, "chosen": "1 2 3", "rejected": "3 2 1"}, setup.tok, max_length=8)
    assert t["truncated"] and len(t["prompt_ids"]) == 4
    assert_one_bos(t["prompt_ids"] + t["chosen_ids"], setup.tok)


def test_reward_classifier_scoring(setup):
    from prefopt.scoring.scorer import ClassifierScorer

    spy = SpyLM(len(setup.tok), classifier=True)
    scores = ClassifierScorer(spy, setup.tok).score([setup.prompt] * 3, ["1 2 3", "3", "1 2 3 4 5 6"], batch_size=2)
    assert scores == [0.0] * 3 and len(spy.seen) == 3
    for ids in spy.seen:
        assert_one_bos(ids, setup.tok)
        assert ids[-1] == setup.tok.eos_token_id  # reward_text's EOS is kept (right padding, then the mask)


def test_reward_likelihood_scoring(setup):
    from prefopt.scoring.likelihood import LikelihoodScorer

    spy = SpyLM(len(setup.tok))
    LikelihoodScorer(spy, setup.tok, beta=1.0).score([setup.prompt] * 2, ["1 2 3", "3"], batch_size=2)
    assert len(spy.seen) == 2
    for ids in spy.seen:
        assert_one_bos(ids, setup.tok)


def test_evaluation_logprob_batches(setup):
    from prefopt.evaluate import metrics as M
    from prefopt.training import logps as L
    from prefopt.evaluate.config import EvaluateConfig
    from prefopt.evaluate.samples import flat, sample_policy

    sec = EvaluateConfig(samples_per_prompt=2, max_new_tokens=3, batch_size=4, backend="transformers",
                         dtype="float32")
    rows = [{"prompt": setup.prompt}] if setup.flavour == "alpaca" else [{"prompt": MESSAGES}]
    s = sample_policy("p", str(setup.path), rows, sec)
    assert s["rendered"] == [setup.prompt]
    spy = SpyLM(len(setup.tok))
    L.response_logps(spy, *flat(s), s["pad_id"])
    assert len(spy.seen) == 2
    for ids in spy.seen:
        assert_one_bos(ids, setup.tok)


def test_ppo_rollout_inputs(setup):
    from prefopt.generation.base import Sampling
    from prefopt.generation.hf import TransformersGenerator
    from prefopt.models.loading import load_causal_lm
    from prefopt.ppo.rollout import collect

    policy = load_causal_lm(str(setup.path))
    spy = SpyLM(len(setup.tok))
    gen = TransformersGenerator(policy, tokenizer=setup.tok, batch_size=2, device="cpu")
    cfg = SimpleNamespace(missing_eos_penalty=0.0, whiten_rewards=False, gamma=1.0, lam=0.95, forward_batch_size=2)
    ro = collect(policy, spy, lambda ids, am: torch.zeros(ids.shape), setup.tok, gen,
                 lambda prompts, comps: torch.zeros(len(prompts)), [setup.prompt] * 2,
                 Sampling(n=1, temperature=1.0, max_new_tokens=3, seed=0), kl_coef=0.1, cfg=cfg)
    for row, m in zip(ro.input_ids, ro.attention_mask):
        assert_one_bos(row[m.bool()], setup.tok)
    assert len(spy.seen) == 2  # the reference read the same rows
    for ids in spy.seen:
        assert_one_bos(ids, setup.tok)


def test_sft_examples(setup):
    from prefopt.sft.recipe import sft_example

    prompt = setup.prompt if setup.flavour == "alpaca" else MESSAGES
    ex = sft_example(prompt, "1 2 3", setup.tok)
    assert_one_bos(ex["input_ids"], setup.tok)
    n = ex["completion_mask"].index(1)
    assert ex["input_ids"][:n] == encode(setup.prompt, setup.tok)  # trained on the prompt that generation sees
    completion = setup.tok.decode(ex["input_ids"][n:], skip_special_tokens=True)
    assert completion.strip() == "1 2 3"
    # the label mask: the completion and the token that ends the family's turn (what generation stops on),
    # nothing before the completion
    assert ex["completion_mask"] == [0] * n + [1] * (len(ex["input_ids"]) - n)
    trained = setup.tok.convert_ids_to_tokens(ex["input_ids"][n:])
    assert TURN_END.get(setup.flavour, setup.tok.eos_token) in trained, trained


def test_sft_trainer_keeps_one_bos(setup, tmp_path):
    """What TRL trains on (its prepared dataset) still has one BOS: it does not tokenize our ids again."""
    if setup.flavour not in ("llama3", "alpaca"):
        pytest.skip("a chat template that writes BOS and plain text cover both ways TRL would tokenize")
    from prefopt.sft.config import SFTStageConfig
    from prefopt.sft.recipe import build_trainer

    prompt = setup.prompt if setup.flavour == "alpaca" else MESSAGES
    rows = [{"prompt": prompt, "completion": c} for c in ("1 2 3", "3 2 1")]
    trainer = build_trainer(SFTStageConfig(max_steps=1, per_device_train_batch_size=2, max_length=256),
                            str(setup.path), rows, tmp_path / "out", seed=0)
    assert len(trainer.train_dataset) == 2
    for ex in trainer.train_dataset:
        assert_one_bos(ex["input_ids"], setup.tok)
        labels = [t for t in ex["labels"] if t != -100]
        assert labels == ex["input_ids"][len(ex["input_ids"]) - len(labels):]  # completion-only loss
        assert setup.tok.decode(labels, skip_special_tokens=True).strip() in ("1 2 3", "3 2 1")


@pytest.mark.parametrize("chat", [False, True])
def test_judge(setup, chat):
    from prefopt.evaluate.judge import LMJudge

    if chat and setup.flavour == "alpaca":
        pytest.skip("a chat judge needs a chat template")
    spy = SpyLM(len(setup.tok))
    judge = LMJudge(spy, setup.tok, chat=chat, batch_size=2)
    judge.prob_a([("Sort 3 1 2", "1 2 3", "3 2 1"), ("Sort 2 1", "1 2", "2 1")])
    assert len(spy.seen) == 2
    for ids in spy.seen:
        assert_one_bos(ids, setup.tok)


def test_vllm_request_ids_equal_the_transformers_generators(setup, monkeypatch):
    """vLLM gets token ids, tokenized with the tokenizer vLLM itself loads from the folder (plain
    AutoTokenizer, no prefopt pad fix-up); they must be the ids the transformers backend generates from."""
    import sys

    from test_generation import _fake_vllm
    from transformers import AutoTokenizer

    from prefopt.generation.base import Sampling
    from prefopt.generation.hf import TransformersGenerator
    from prefopt.generation.vllm_backend import VLLMGenerator
    from prefopt.models.loading import load_causal_lm

    prompts = [setup.prompt, setup.prompt + " 4"]
    gen = TransformersGenerator(load_causal_lm(str(setup.path)), tokenizer=setup.tok, batch_size=2, device="cpu")
    seen, real = [], gen.model.generate

    def spy(input_ids, attention_mask, **kw):
        seen.extend(row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask))
        return real(input_ids=input_ids, attention_mask=attention_mask, **kw)

    gen.model.generate = spy
    gen.generate(prompts, Sampling(n=1, temperature=1.0, max_new_tokens=1, seed=0))
    calls = {"tokenizer": AutoTokenizer.from_pretrained(str(setup.path))}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    VLLMGenerator(str(setup.path)).generate(prompts, Sampling(n=1, temperature=1.0, max_new_tokens=1, seed=0))
    got = [p["prompt_token_ids"] for p in calls["prompts"]]
    assert sorted(got) == sorted(seen)  # the transformers backend batches longest first
    for ids in seen:
        assert_one_bos(ids, setup.tok)
