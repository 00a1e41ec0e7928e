"""Config loading: overrides in both forms, type coercion, and the errors that name the key."""

import pytest

from prefopt.config import ConfigError, from_dict, parse_overrides, to_dict

from prefopt.experiment import load_config
from prefopt.experiment import ExperimentConfig, resolve, stage_inputs
from prefopt.stage import fingerprint


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_overrides_both_forms_and_types(tmp_path):
    p = write(tmp_path, "name: e\nsft:\n  learning_rate: 1e-3\n")
    cfg = load_config(p, ["--sft.learning_rate=1e-5", "--seed", "7", "--dpo.beta", "0.25", "--stages=[sft,dpo]"])
    assert cfg.sft.learning_rate == 1e-5 and isinstance(cfg.sft.learning_rate, float)
    assert cfg.seed == 7 and cfg.dpo.beta == 0.25
    assert cfg.stages == ["sft", "dpo"]
    # YAML 1.1 reads 1e-3 (no dot) as a string; the loader still makes it a float
    assert load_config(p).sft.learning_rate == 1e-3


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b=1", "--c", "x", "--d=[1,2]"]) == {"a.b": 1, "c": "x", "d": [1, 2]}
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="expected an override"):
        parse_overrides(["a.b=1"])


def test_unknown_key_lists_valid_ones(tmp_path):
    p = write(tmp_path, "name: e\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["--sft.learning_rat=1"])
    msg = str(e.value)
    assert "sft.learning_rat" in msg and "learning_rate" in msg and "trl.SFTConfig" in msg
    with pytest.raises(ConfigError, match="unknown key 'nme'.*name"):
        from_dict(ExperimentConfig, {"name": "x", "nme": 1})


def test_wrong_type_and_missing_required(tmp_path):
    with pytest.raises(ConfigError, match="sft.learning_rate: expected a number, got 'fast'"):
        from_dict(ExperimentConfig, {"name": "x", "sft": {"learning_rate": "fast"}})
    with pytest.raises(ConfigError, match="pairs.strategy: expected one of"):
        from_dict(ExperimentConfig, {"name": "x", "pairs": {"strategy": "best"}})
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        from_dict(ExperimentConfig, {})
    with pytest.raises(ConfigError, match="unknown stage"):
        from_dict(ExperimentConfig, {"name": "x", "stages": ["sft", "rlhf"]})


def test_trl_passthrough_is_type_checked():
    cfg = from_dict(ExperimentConfig, {"name": "x", "sft": {"backend": "trl", "packing": True, "eos_token": "</s>"}})
    assert cfg.sft.trainer_args == {"packing": True, "eos_token": "</s>"}
    assert to_dict(cfg)["sft"]["packing"] is True  # written back flat in the resolved config
    with pytest.raises(ConfigError, match="sft.packing: expected true/false"):
        from_dict(ExperimentConfig, {"name": "x", "sft": {"backend": "trl", "packing": "maybe"}})
    # the prefopt loop (the default backend) takes no TRL arguments: one would be silently ignored
    with pytest.raises(ConfigError, match="sft.eos_token: is a trl.SFTConfig field: it applies with sft.backend=trl"):
        from_dict(ExperimentConfig, {"name": "x", "sft": {"eos_token": "</s>"}})


def test_references_resolve_and_feed_fingerprints(tmp_path):
    cfg = from_dict(ExperimentConfig, {"name": "x", "output_dir": str(tmp_path)})
    assert resolve(cfg, "stage:sft") == str(tmp_path / "x" / "sft" / "model")
    assert resolve(cfg, "stage:task/sft.jsonl") == str(tmp_path / "x" / "task" / "sft.jsonl")
    assert resolve(cfg, "org/model") == "org/model"
    assert stage_inputs(cfg, "sft") == ["base", "task"]
    before = {s: fingerprint(cfg, s) for s in ["task", "sft", "generate", "dpo", "reward"]}
    cfg.sft.learning_rate = 0.5
    after = {s: fingerprint(cfg, s) for s in before}
    # changing SFT changes SFT and what reads it, not the task or the reward model
    assert after["task"] == before["task"] and after["reward"] == before["reward"]
    assert all(after[s] != before[s] for s in ["sft", "generate", "dpo"])


def test_real_model_named_in_base(tmp_path):
    cfg = from_dict(ExperimentConfig, {"name": "x", "base": {"model": "google/gemma-2-9b-it"}})
    assert resolve(cfg, "stage:base") == "google/gemma-2-9b-it"


def test_a_model_is_prompted_as_it_was_trained():
    """A stage reading another stage's model must use that stage's template: mixing them fails nothing and only
    makes the figures worse, so it is refused naming both keys."""
    q = "experiments/quickstart.yaml"
    with pytest.raises(ConfigError, match=r"generate\.template.*'chat'.*stage:sft.*sft\.template 'alpaca'"):
        load_config(q, ["--generate.template=chat"])
    with pytest.raises(ConfigError, match=r"evaluate\.template.*stage:dpo.*dpo\.template 'chat'"):
        load_config(q, ["--stages=[dpo,evaluate]", "--dpo.template=chat"])
    # PPO reads the reward model with the policy's text: the reward model must be trained on that text too
    with pytest.raises(ConfigError, match=r"ppo\.template.*stage:reward.*reward\.template 'chat'"):
        load_config(q, ["--stages=[reward,ppo]", "--reward.template=chat"])
    # every stage on one template is the chat recipe; a model stage not run here is not compared
    every = [f"--{s}.template=chat" for s in ("sft", "generate", "reward", "score", "dpo", "simpo", "ppo", "evaluate")]
    assert load_config(q, every).evaluate.template == "chat"
    assert load_config(q, ["--stages=[generate,evaluate]", "--generate.template=chat",
                           "--evaluate.template=chat"]).generate.template == "chat"
