"""A hub reward model with its own modeling code, scoring as ArmoRM does (RLHFlow/ArmoRM-Llama3-8B-v0.1).

ArmoRM ships its model class beside its weights (`auto_map` in config.json, loaded with `trust_remote_code=True`),
reads the raw prompt and response in its own (Llama-3) chat template with its own tokenizer, and returns a
`score` (the gated combination of its objectives) beside the per-objective `logits`. The reward is `score`, not
`logits[:, 0]`.

The model here is built locally in that manner: a tiny Llama backbone, a 3-objective regression head and a gating
layer, in `configuration_gated.py` / `modeling_gated.py` next to the weights, with a tokenizer trained on other
texts than the policy's (another vocabulary) that carries a Llama-3-style template. `score` is scaled and shifted
away from every objective, so a test can tell which one was read. Its `model_type` is its own, so transformers
refuses it untrusted; a stand-in closer to ArmoRM's real file (model_type `llama`, the imports transformers 5 lacks,
the first-pad lookup, 19 objectives) is in tests/test_hub_reward_models.py, which reuses `LLAMA3_TEMPLATE` and `user`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from tokenizers import AddedToken

from prefopt.scoring import scorer as score_module

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
RM_TEXTS = ["user assistant header Sort the numbers in ascending order: 9 8 7 6 5 4 3 2 1 0",
            "A multi-objective reward model reads whole conversations: helpfulness, correctness, verbosity."] * 10
NUM_OBJECTIVES = 3

CONFIGURATION_PY = '''
from transformers import LlamaConfig


class GatedRMConfig(LlamaConfig):
    """A Llama backbone with a multi-objective head and a gating layer (ArmoRM's shape)."""

    model_type = "gated_rm"

    def __init__(self, num_objectives=3, score_scale=3.0, score_shift=0.5, **kwargs):
        self.num_objectives = num_objectives
        self.score_scale = score_scale
        self.score_shift = score_shift
        super().__init__(**kwargs)
'''

MODELING_PY = '''
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput

from .configuration_gated import GatedRMConfig


@dataclass
class GatedRewardOutput(ModelOutput):
    score: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    gating_output: Optional[torch.FloatTensor] = None


class GatedRMForSequenceClassification(LlamaPreTrainedModel):
    """Objectives (B, num_objectives) from the last token's hidden state, mixed by a softmax gate into one score
    (B, 1), then scaled and shifted: the score is none of the objectives."""

    config_class = GatedRMConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.gating = nn.Linear(config.hidden_size, config.num_objectives)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.long().sum(-1) - 1  # right padded: the last real token
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        rewards = self.regression_layer(h)
        gate = torch.softmax(self.gating(h), dim=-1)
        score = (rewards * gate).sum(-1, keepdim=True) * self.config.score_scale + self.config.score_shift
        return GatedRewardOutput(score=score, logits=rewards, gating_output=gate)
'''


def rm_tokenizer():
    from prefopt.models.loading import build_tokenizer

    tok = build_tokenizer(RM_TEXTS, vocab_size=290)
    tok.add_tokens([AddedToken(s, special=True, normalized=False)
                    for s in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")], special_tokens=True)
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def remote_rm(tmp_path_factory) -> Path:
    """The folder a hub reward model with remote code is: config.json with `auto_map`, the two .py files, weights
    (save_pretrained), and its own tokenizer with its chat template. No `reward_model.json` (not prefopt's)."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("remote_rm") / "armo_like_rm"
    out.mkdir()
    (out / "configuration_gated.py").write_text(CONFIGURATION_PY)
    (out / "modeling_gated.py").write_text(MODELING_PY)
    tok = rm_tokenizer()
    tok.save_pretrained(out)
    config = {
        "model_type": "gated_rm", "architectures": ["GatedRMForSequenceClassification"],
        "auto_map": {"AutoConfig": "configuration_gated.GatedRMConfig",
                     "AutoModelForSequenceClassification": "modeling_gated.GatedRMForSequenceClassification"},
        "vocab_size": len(tok), "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 32, "max_position_embeddings": 256,
        "num_objectives": NUM_OBJECTIVES, "score_scale": 3.0, "score_shift": 0.5,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    transformers.set_seed(0)
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_config(cfg, trust_remote_code=True)
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "gated_rm" and saved["auto_map"] == config["auto_map"], saved
    assert (out / "modeling_gated.py").read_text() == MODELING_PY  # still the file config.json points at
    assert not (out / "reward_model.json").exists()
    return out


def direct_scores(folder: Path, prompts: list[list[dict]], responses: list[str]) -> tuple[list[float], list[list[float]]]:
    """(score, logits) of each (messages, response), one unpadded forward each, through the folder's own code,
    its own tokenizer and template, tokenized as written (the template writes BOS itself)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True,
                                                               dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    scores, logits = [], []
    with torch.no_grad():
        for messages, response in zip(prompts, responses):
            text = tok.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            assert ids[0, 0].item() == tok.bos_token_id and (ids == tok.bos_token_id).sum().item() == 1
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            assert out.score.shape == (1, 1) and out.logits.shape == (1, NUM_OBJECTIVES)
            scores.append(out.score.item())
            logits.append(out.logits[0].tolist())
    return scores, logits


def user(instruction: str, inp: str) -> list[dict]:
    return [{"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction}]


# ------------------------------------------------------------------------------------------------ load_scorer


def test_load_scorer_runs_the_models_own_code_and_reads_its_score(remote_rm):
    scorer = score_module.load_scorer(str(remote_rm), trust_remote_code=True)
    assert type(scorer.model).__name__ == "GatedRMForSequenceClassification"
    assert type(scorer.model).__module__.startswith("transformers_modules")  # the folder's code, not a built-in
    assert scorer.model.config.model_type == "gated_rm"

    prompts = [user("Sort the numbers in ascending order.", "3 1 2"), user("Sort the numbers.", "9 8 7 6 5"),
               user("Say hello.", ""), user("Sort the numbers in ascending order.", "3 1 2")]
    responses = ["1 2 3", "5 6 7 8 9 and that is all", "hello", "3 2 1"]
    # batch_size 3: padded batches (lengths differ), the last non-pad token read by the model's own code
    got = scorer.score(prompts, responses, batch_size=3, max_length=256)
    want, logits = direct_scores(remote_rm, prompts, responses)
    assert len(got) == 4 and all(math.isfinite(s) for s in got)
    assert got == pytest.approx(want, abs=1e-5)
    for s, lg in zip(got, logits):  # the score field, not the first objective
        assert abs(s - lg[0]) > 1e-2, (s, lg)
    assert len({round(s, 6) for s in got}) == 4  # the responses are told apart


def test_rm_input_format_sees_the_template(remote_rm):
    fmt = score_module.rm_input_format("auto", str(remote_rm), "ppo.rm_format", trust_remote_code=True)
    assert fmt == "chat"  # a hub reward model (no reward_model.json) with a chat template
    assert score_module.rm_input_format("chat", str(remote_rm), "ppo.rm_format", trust_remote_code=True) == "chat"


def test_load_scorer_without_trust_remote_code_is_refused(remote_rm):
    from prefopt.config import ConfigError

    with pytest.raises(ConfigError, match=r"ships its own model code \(auto_map in its config.json\): set "
                                          r"score.trust_remote_code: true"):
        score_module.load_scorer(str(remote_rm), key="score.trust_remote_code")


# ------------------------------------------------------------------------------------------------ the ppo stage


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"instruction": "Sort the numbers in ascending order.",
             "input": " ".join(str((i * 7 + j) % 10) for j in range(3))} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ppo_config(tmp_path: Path, name: str, policy: Path, rm: Path, prompts: Path, **ppo):
    from prefopt.experiment import load_config

    section = {"policy": str(policy), "reward_model": str(rm), "prompts": {"path": str(prompts)},
               "rm_format": "chat", "value_init": "policy", "trust_remote_code": True,
               "total_episodes": 8, "rollout_batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1,
               "max_new_tokens": 4, "learning_rate": 1e-3, "value_learning_rate": 1e-3, "save_every": 1, **ppo}
    cfg = {"name": name, "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "stages": ["ppo"],
           "ppo": section}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


@pytest.fixture
def scorer_spy(monkeypatch) -> SimpleNamespace:
    """Every `.score` call of the scorers PPO loads through the real `load_scorer`: what it was given and what it
    returned, and each load's trust_remote_code."""
    spy = SimpleNamespace(calls=[], loads=[])
    real = score_module.load_scorer

    def load(path, trust_remote_code=False, **kw):
        spy.loads.append((path, trust_remote_code))
        scorer = real(path, trust_remote_code)
        inner = scorer.score

        def score(prompts, responses, *args, **kwargs):
            out = inner(prompts, responses, *args, **kwargs)
            spy.calls.append((list(prompts), list(responses), list(out)))
            return out

        scorer.score = score
        return scorer

    monkeypatch.setattr(score_module, "load_scorer", load)
    return spy


def test_ppo_rewards_are_the_remote_models_score(tmp_path, tiny_model_dir, remote_rm, prompts_file, scorer_spy):
    """Two PPO iterations against the remote-code reward model: each iteration's logged `reward` is the mean of
    the `score` field for that rollout's (raw prompt, response) in the reward model's own template, recomputed
    here by a direct forward."""
    from prefopt.models.loading import load_tokenizer
    from prefopt.stage import run_stage
    from prefopt.runtime.tracking import read_metrics

    assert load_tokenizer(str(tiny_model_dir)).get_vocab() != load_tokenizer(str(remote_rm)).get_vocab()
    cfg = ppo_config(tmp_path, "remote", tiny_model_dir, remote_rm, prompts_file)
    summary = run_stage(cfg, "ppo")
    assert summary["iterations"] == 2 and summary["episodes"] == 8
    assert math.isfinite(summary["reward"])
    assert scorer_spy.loads == [(str(remote_rm), True)]

    rows = read_metrics(cfg.root / "ppo")
    assert [r["step"] for r in rows] == [1, 2]
    assert len(scorer_spy.calls) == 2  # one scoring call per rollout
    raw = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    allowed = [user(r["instruction"], r["input"]) for r in raw]
    for row, (prompts, responses, scores) in zip(rows, scorer_spy.calls):
        assert len(prompts) == len(responses) == len(scores) == 4
        assert all(p in allowed for p in prompts)  # the user's own turns, never the policy's rendered text
        assert all(isinstance(r, str) for r in responses)
        want, logits = direct_scores(remote_rm, prompts, responses)
        assert scores == pytest.approx(want, abs=1e-5)
        assert all(abs(s - lg[0]) > 1e-2 for s, lg in zip(scores, logits))  # `score`, not logits[:, 0]
        assert all(math.isfinite(s) for s in scores)
        assert row["reward"] == pytest.approx(sum(want) / len(want), abs=1e-5)
    assert summary["reward"] == pytest.approx(rows[-1]["reward"], abs=1e-9)
    assert (cfg.root / "ppo" / "model" / "model.safetensors").exists()


def test_ppo_without_trust_remote_code_fails_before_training(tmp_path, tiny_model_dir, remote_rm, prompts_file,
                                                             monkeypatch):
    from prefopt.ppo import recipe
    from prefopt.stage import run_stage

    trained = []
    monkeypatch.setattr(recipe, "train", lambda *a, **k: trained.append(1) or {"iterations": 0})
    loaded = []
    monkeypatch.setattr(recipe, "load_models", lambda *a, **k: loaded.append(1))
    cfg = ppo_config(tmp_path, "untrusted", tiny_model_dir, remote_rm, prompts_file, trust_remote_code=False)
    from prefopt.config import ConfigError

    with pytest.raises(ConfigError, match="set ppo.trust_remote_code: true"):
        run_stage(cfg, "ppo")
    assert trained == [] and loaded == []  # refused before any weights load
    assert not (cfg.root / "ppo" / "checkpoints").exists() and not (cfg.root / "ppo" / "model").exists()


def test_value_model_from_a_reward_model_without_a_scalar_head_is_refused(tmp_path, remote_rm, monkeypatch):
    """value_init: reward reads the reward head at every token; ArmoRM-like models have a gated multi-objective
    head instead: a one-line error naming ppo.value_init, not a crash inside the first rollout. (The policy here is
    the reward model's own folder, so the vocabularies agree and the head is what is checked.)"""
    from types import SimpleNamespace

    from prefopt.config import ConfigError
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.setup import load_models

    monkeypatch.setattr("prefopt.models.loading.load_causal_lm", lambda *a, **k: torch.nn.Linear(1, 1))
    cfg = PPOConfig(policy="p", reward_model=str(remote_rm), value_init="reward", trust_remote_code=True,
                    total_episodes=4, rollout_batch_size=2, mini_batch_size=2)
    ctx = SimpleNamespace(resolve=lambda value, model=True: str(remote_rm) if value == "p" else value)
    with pytest.raises(ConfigError, match=r"has no scalar `score` head to read per token \(use ppo.value_init: policy\)"):
        load_models(ctx, cfg)
