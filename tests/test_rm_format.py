"""Reward models in their own format (issue 10, item 2).

A hub reward model (Skywork-Reward, ArmoRM) was trained on its own chat template applied to (user prompt,
response), tokenized by its own tokenizer, whose vocabulary need not be the policy's. `rm_format: chat` gives it
exactly that, built from the row's raw prompt (instruction/input or chat messages), never from the policy's
rendered text; `policy` keeps the policy-rendered text the `reward` stage trains on; `auto` tells the two kinds of
reward model apart by prefopt's `reward_model.json`.

The reward model here is a tiny sequence classifier whose tokenizer is trained on other texts than the policy's
(another vocabulary) and carries a template in the manner of Llama-3's, which writes `{{ bos_token }}` itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken

from prefopt.config import ConfigError, from_dict
from prefopt.data.templates import alpaca_prompt, prompt_messages
from prefopt.experiment import ExperimentConfig
from prefopt.generation.base import Completion
from prefopt.scoring import scorer as score
from prefopt.scoring.scorer import rm_input_format
from prefopt.stage import run_stage
from prefopt.io import read_jsonl, write_jsonl

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
RM_TEXTS = ["user assistant header Sort the numbers in ascending order: 9 8 7 6 5 4 3 2 1 0",
            "A reward model reads whole conversations and scores the answer."] * 10
INSTRUCTION, INPUT = "Sort the numbers in ascending order.", "3 1 2"
RESPONSES = ["1 2 3", "3 2 1"]
# What the reward model must read in `chat` mode for (INSTRUCTION, INPUT) and "1 2 3": its own template, one BOS.
CHAT_TEXT = ("<s><|start_header_id|>user<|end_header_id|>\n\nSort the numbers in ascending order.\n\n3 1 2<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n1 2 3<|eot_id|>")


def rm_tokenizer(template: str | None = LLAMA3_TEMPLATE):
    from prefopt.models.loading import build_tokenizer

    tok = build_tokenizer(RM_TEXTS, vocab_size=290)
    tok.add_tokens([AddedToken(s, special=True, normalized=False)
                    for s in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")], special_tokens=True)
    tok.chat_template = template
    return tok


def hub_rm(tok, out: Path) -> Path:
    """A sequence classifier saved as a hub model is (plain save_pretrained: no prefopt `reward_model.json`)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=256, num_labels=1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rms(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("rms")
    return SimpleNamespace(hub=hub_rm(rm_tokenizer(), root / "hub"), bare=hub_rm(rm_tokenizer(None), root / "bare"))


@pytest.fixture
def spy(monkeypatch) -> list[list[int]]:
    """The token ids every reward-model forward pass is given (padding removed), through the real `load_scorer`."""
    seen: list[list[int]] = []
    real = score.load_scorer

    def record(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))

    def load(path, trust_remote_code=False, **kw):
        scorer = real(path, trust_remote_code)
        scorer.model.register_forward_pre_hook(record, with_kwargs=True)
        return scorer

    monkeypatch.setattr(score, "load_scorer", load)
    return seen


def shard_row() -> dict:
    """A generate shard row: the policy's rendered prompt, and the raw instruction/input in `meta`."""
    return {"prompt_id": "p0", "prompt": alpaca_prompt(INSTRUCTION, INPUT), "candidates": RESPONSES,
            "meta": {"instruction": INSTRUCTION, "input": INPUT}}


def score_stage(tmp_path: Path, rm_dir: Path, rm_format: str, rows=None) -> tuple[dict, list[float]]:
    write_jsonl(tmp_path / "t" / "generate" / "shard-00000.jsonl", rows or [shard_row()])
    cfg = from_dict(ExperimentConfig, {"name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"},
                                       "score": {"reward_model": str(rm_dir), "rm_format": rm_format}})
    summary = run_stage(cfg, "score")
    return summary, read_jsonl(tmp_path / "t" / "score" / "shard-00000.jsonl")[0]["scores"]


# ------------------------------------------------------------------------------------------------ what it reads


def test_the_two_tokenizers_really_differ(tiny_model_dir, rms):
    """Policy token ids fed to this reward model would be other words: the tests below would see them."""
    from prefopt.models.loading import load_tokenizer

    policy, rm = load_tokenizer(str(tiny_model_dir)), load_tokenizer(str(rms.hub))
    assert policy.get_vocab() != rm.get_vocab()
    assert policy("1 2 3 ascending")["input_ids"] != rm("1 2 3 ascending")["input_ids"]
    assert rm(CHAT_TEXT)["input_ids"][:2] == [rm.bos_token_id] * 2  # plain tokenization would double the BOS


def test_chat_mode_gives_the_reward_model_its_own_template_with_one_bos(tmp_path, rms, spy):
    from prefopt.models.loading import load_tokenizer

    tok = load_tokenizer(str(rms.hub))
    summary, scores = score_stage(tmp_path, rms.hub, "chat")
    assert summary["rm_format"] == "chat" and len(scores) == 2
    messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{INPUT}"}]
    texts = [tok.apply_chat_template([*messages, {"role": "assistant", "content": r}], tokenize=False)
             for r in RESPONSES]
    assert texts[0] == CHAT_TEXT
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert sorted(spy) == sorted(want)
    for ids in spy:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")  # the template closes the turn; no EOS added


def test_policy_mode_keeps_the_policy_text(tmp_path, rms, spy):
    from prefopt.models.loading import load_tokenizer

    tok = load_tokenizer(str(rms.hub))
    summary, _ = score_stage(tmp_path, rms.hub, "policy")
    assert summary["rm_format"] == "policy"
    texts = [alpaca_prompt(INSTRUCTION, INPUT) + r + "</s>" for r in RESPONSES]  # today's: prompt + response + EOS
    assert sorted(spy) == sorted(tok(t)["input_ids"] for t in texts)
    assert all(ids.count(tok.bos_token_id) == 1 for ids in spy)


def test_chat_and_policy_scores_are_cached_apart(tmp_path, rms):
    _, chat = score_stage(tmp_path / "a", rms.hub, "chat")
    _, policy = score_stage(tmp_path / "a", rms.hub, "policy")  # same experiment folder, same cache file
    assert chat != policy


def test_ppo_scores_decoded_text_with_the_reward_models_tokenizer(tmp_path, tiny_model_dir, rms, spy):
    """PPO's score function gives the reward model the response text (never the policy's ids) in its own template,
    and agrees with the score stage on the same (prompt, response)."""
    from prefopt.models.loading import load_tokenizer
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.setup import rm_score_fn

    _, stage_scores = score_stage(tmp_path, rms.hub, "auto")
    stage_seen = list(spy)
    spy.clear()

    policy_tok = load_tokenizer(str(tiny_model_dir))
    rows = [{"prompt_id": "p0", "prompt": alpaca_prompt(INSTRUCTION, INPUT),
             "meta": {"instruction": INSTRUCTION, "input": INPUT}}]
    rendered = [r["prompt"] for r in rows]
    ctx = SimpleNamespace(resolve=lambda p, model=True: p)
    fn = rm_score_fn(ctx, PPOConfig(reward_model=str(rms.hub), mini_batch_size=1), rows, rendered,
                     SimpleNamespace(device="cpu", distributed_type=None, print=print))
    completions = [Completion(r, policy_tok(r, add_special_tokens=False)["input_ids"] + [policy_tok.eos_token_id])
                   for r in RESPONSES]
    ppo_scores = fn(rendered * 2, completions)
    torch.testing.assert_close(ppo_scores, torch.tensor(stage_scores), rtol=0, atol=1e-5)
    assert sorted(spy) == sorted(stage_seen)  # the reward model's own ids of its own template (test above)


# ------------------------------------------------------------------------------------------------ auto


def test_auto_tells_hub_reward_models_from_prefopt_ones(tmp_path, rms):
    from prefopt.models.loading import load_reward_model, load_tokenizer, save_model

    assert rm_input_format("auto", str(rms.hub), "score.rm_format") == "chat"
    assert rm_input_format("auto", str(rms.bare), "score.rm_format") == "policy"  # no template: nothing else to do
    assert rm_input_format("auto", str(rms.hub), "score.rm_format", from_stage=True) == "policy"
    # the same classifier saved by prefopt (as the reward stage saves it) is marked, and keeps the policy's text
    mine = save_model(load_reward_model(str(rms.hub)), load_tokenizer(str(rms.hub)), tmp_path / "mine")
    assert json.loads((mine / "reward_model.json").read_text())["kind"] == "classifier"
    assert rm_input_format("auto", str(mine), "score.rm_format") == "policy"
    assert rm_input_format("chat", str(mine), "score.rm_format") == "chat"  # asked for: given


def test_raw_prompt_comes_from_the_row_data():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert prompt_messages({"prompt": chat, "meta": {}}) == chat
    assert prompt_messages({"prompt": "<rendered>", "meta": {"messages": chat}}) == chat
    assert prompt_messages({"prompt": "<rendered>", "meta": {"instruction": "Do it.", "input": ""}}) == [
        {"role": "user", "content": "Do it."}]
    assert prompt_messages({"prompt": "### Instruction:\nDo it.\n\n### Response:\n", "meta": {}}) is None


def test_generate_rows_keep_a_chat_prompts_turns():
    from prefopt.generate.recipe import row_meta

    chat = [{"role": "user", "content": "Hi"}]
    assert row_meta({"prompt": chat, "meta": {}}) == {"messages": chat}
    assert row_meta({"prompt": "text", "meta": {"instruction": "i", "input": ""}}) == {"instruction": "i", "input": ""}


# ------------------------------------------------------------------------------------------------ bad input


def test_chat_without_a_template_is_one_line_naming_key_and_model(tmp_path, rms, spy):
    want = (f"score.rm_format: chat, but the reward model {rms.bare} has no chat template in its tokenizer (use "
            "score.rm_format: policy)")
    with pytest.raises(ConfigError) as e:
        rm_input_format("chat", str(rms.bare), "score.rm_format")
    assert str(e.value) == want
    with pytest.raises(ConfigError, match="^score.rm_format: chat, but the reward model"):
        score_stage(tmp_path, rms.bare, "chat")
    assert spy == [] and not (tmp_path / "t" / "score" / "shard-00000.jsonl").exists()  # before any scoring


def test_prefopt_check_reports_it(tmp_path, rms):
    from prefopt.checks import problems_and_warnings

    cfg = from_dict(ExperimentConfig, {"name": "t", "output_dir": str(tmp_path), "stages": ["score", "ppo"],
                                       "score": {"reward_model": str(rms.bare), "rm_format": "chat"},
                                       "ppo": {"policy": str(rms.hub), "reward_model": str(rms.hub),
                                               "rm_format": "chat"}})
    problems, _ = problems_and_warnings(cfg)
    assert [p for p in problems if "rm_format" in p] == [
        f"score.rm_format: chat, but the reward model {rms.bare} has no chat template in its tokenizer (use "
        "score.rm_format: policy)"]


def test_chat_without_a_raw_prompt_names_the_row(tmp_path, rms, spy):
    row = {**shard_row(), "meta": {}}
    with pytest.raises(ConfigError, match=r"prompt_id 'p0' \(.*shard-00000.jsonl, row 1\) has only rendered text"):
        score_stage(tmp_path, rms.hub, "chat", rows=[row])
    assert spy == []


def test_ppo_value_model_from_a_reward_model_with_another_vocabulary_is_refused(tiny_model_dir, rms):
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.setup import load_models

    ctx = SimpleNamespace(resolve=lambda p, model=True: p)
    with pytest.raises(ConfigError, match=r"^ppo.value_init: reward, but the reward model .*hub has another "
                                          r"tokenizer than the policy"):
        load_models(ctx, PPOConfig(policy=str(tiny_model_dir), reward_model=str(rms.hub)))


def test_chat_with_a_likelihood_reward_model_is_refused(tmp_path):
    """A likelihood reward model is prefopt's own, trained on the policy's text: no template of its own to use."""
    from prefopt.scoring.likelihood import write_meta

    write_meta(tmp_path, beta=2.0)
    with pytest.raises(ConfigError) as e:
        rm_input_format("chat", str(tmp_path), "evaluate.rm_format")
    assert str(e.value) == (f"evaluate.rm_format: chat needs a sequence-classification reward model, but {tmp_path} "
                            "is a likelihood reward model trained on the policy's text (use evaluate.rm_format: "
                            "policy)")
    assert rm_input_format("auto", str(tmp_path), "evaluate.rm_format") == "policy"
