"""PPO's passes over a rollout read as a prefix tree (prefopt.ppo.rollout.tree_batch): the policy's and reference's
per-token log-probs and entropies and the value model's values equal the padded forward's on every family the
conformance suite builds (sliding windows and soft-caps included), and their gradients too; the rollout's
counts for the throughput meter are what the trees computed; a model whose attention cannot read a tree is run
padded."""

from __future__ import annotations

import pytest
import torch
import transformers

from families import FAMILIES, build_model, build_tokenizer
from prefopt.models import varlen
from prefopt.ppo.rollout import ValueModel, build_batch, policy_forward, tree_batch, value_forward


def _rollout_rows(tok, n_prompts: int = 3, samples: int = 3):
    """Prompts that share a 6-token head (a template's), each sampled `samples` times; responses of 1-7 tokens,
    two of one prompt starting alike."""
    g = torch.Generator().manual_seed(0)
    ids = lambda k: torch.randint(10, len(tok), (k,), generator=g).tolist()  # noqa: E731
    head = ids(6)
    prompts, responses = [], []
    for i in range(n_prompts):
        prompt = head + ids(4 + 3 * i)
        for k in range(samples):
            prompts.append(prompt)
            responses.append(ids(1 + (2 * k + i) % 7))
        responses[-1] = responses[-2][:2] + ids(3)
    return build_batch(prompts, responses, pad_id=0)


def _models(family: str, attn: str):
    fam = FAMILIES[family]
    tok = build_tokenizer(fam)
    policy = build_model(fam, tok, attn, hidden_size=32).eval()
    config = policy.config
    config.num_labels = 1
    transformers.set_seed(1)
    value = ValueModel(transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation=attn))
    return tok, policy, value.float().eval()


@pytest.mark.parametrize("family,attn", [(f, a) for f in FAMILIES for a in FAMILIES[f].attn])
def test_tree_passes_equal_the_padded_ones(family, attn):
    tok, policy, value = _models(family, attn)
    b = _rollout_rows(tok)
    rows = b["input_ids"], b["attention_mask"], b["mask"]
    tree = tree_batch(*rows)
    assert int(tree["num_tokens"]) < int(b["attention_mask"].sum()) * 0.6  # the head and each prompt once
    with torch.no_grad():
        for temperature in (1.0, 0.7):
            padded = policy_forward(policy, *rows, temperature)
            got = policy_forward(policy, *rows, temperature, tree)
            for p, t in zip(padded, got):
                torch.testing.assert_close(t, p, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(value_forward(value, *rows, tree), value_forward(value, *rows), atol=2e-5,
                                   rtol=1e-5)
    assert policy.config._attn_implementation == attn  # switched for the call only (the policy also generates)


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_tree_gradients_equal_the_padded_ones(family):
    """PPO's update trains through these passes: a leak through a prefix shows in the gradients first."""
    tok, policy, value = _models(family, "eager")
    b = _rollout_rows(tok)
    rows = b["input_ids"], b["attention_mask"], b["mask"]
    tree = tree_batch(*rows)
    weights = torch.linspace(-1, 1, b["mask"].numel()).view_as(b["mask"])
    grads = []
    for t in (None, tree):
        policy.zero_grad()
        value.zero_grad()
        logps, _ = policy_forward(policy, *rows, 0.9, t)
        values = value_forward(value, *rows, t)
        ((logps * weights).sum() + (values * weights * b["mask"]).sum()).backward()
        grads.append({n: p.grad.clone() for m in (policy, value) for n, p in m.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_the_tree_by_hand():
    """Two rows with the prompt 5 6: responses 7 8 and 9 (the actions). Laid down 5 6 7 8 9 at positions 0 1 2 3 2;
    the logits kept are those of row positions 1 (predicting 7 and 9: computed once) and 2 (predicting 8)."""
    b = build_batch([[5, 6], [5, 6]], [[7, 8], [9]], pad_id=0)
    tree = tree_batch(b["input_ids"], b["attention_mask"], b["mask"])
    assert tree["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and tree["position_ids"].tolist() == [[0, 1, 2, 3, 2]]
    assert tree["keep"].tolist() == [1, 2] and tree["target_ids"].tolist() == [7, 8, 9]
    assert tree["pick"].tolist() == [0, 1, 0] and tree["flat"].tolist() == [1, 2, 4]  # (b, t) -> b * 3 + t
    assert int(tree["num_tokens"]) == 5


def test_flash_attention_is_run_padded():
    """A policy whose attention cannot read a shared prefix gets the padded rows (never a tree it would misread)."""
    tok, policy, value = _models("llama3", "sdpa")
    policy.config._attn_implementation = "flash_attention_2"  # what the check reads; the forward is not run
    assert not varlen.reads_pieces(policy)
    with varlen.switched(policy) as reads:
        assert reads is False and policy.config._attn_implementation == "flash_attention_2"


def test_the_rollout_counts_what_its_trees_computed(tiny_model_dir):
    """`collect` on a real policy (the transformers backend samples): the positions its passes computed are its
    chunks' trees' (no padding), fewer than the rows' real tokens; and the policy samples again after it (its
    attention was switched for the passes only)."""
    from prefopt.data.templates import alpaca_prompt
    from prefopt.generation.base import Sampling
    from prefopt.generation.hf import TransformersGenerator
    from prefopt.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.rollout import collect

    tok = load_tokenizer(str(tiny_model_dir))
    policy = load_causal_lm(str(tiny_model_dir), dtype="float32").eval()
    ref = load_causal_lm(str(tiny_model_dir), dtype="float32").eval()
    value = ValueModel(load_reward_model(str(tiny_model_dir), dtype=torch.float32)).eval()
    generator = TransformersGenerator(policy, tok)
    prompts = [alpaca_prompt("Sort the numbers.", f"{i} 3 1") for i in range(6)]
    cfg = PPOConfig(policy=str(tiny_model_dir), reward_model=str(tiny_model_dir), rollout_batch_size=6,
                    mini_batch_size=3, forward_batch_size=3, total_episodes=6)
    sampling = Sampling(n=1, temperature=1.0, max_new_tokens=5, seed=0)
    ro = collect(policy, ref, value, tok, generator, lambda p, c: torch.zeros(len(p)), prompts, sampling, 0.1, cfg)
    trees = [tree_batch(ro.input_ids[i:i + 3], ro.attention_mask[i:i + 3], ro.mask[i:i + 3]) for i in (0, 3)]
    computed = sum(int(t["num_tokens"]) for t in trees)
    assert {k: ro.computed[k] for k in ("tokens", "positions", "useful")} == {
        "tokens": int(ro.attention_mask.sum()), "positions": computed, "useful": computed}
    assert [int(b["num_tokens"]) for b in ro.computed["batches"]] == [int(t["num_tokens"]) for t in trees]
    assert computed < ro.computed["tokens"] / 2  # the Alpaca preamble once per chunk
    assert len(generator.generate(prompts[:2], sampling)) == 2
