"""The `reward` stage: held-out metrics by hand, explicit TRL settings, resume, LoRA, and the gold task's accuracy."""

import json
import statistics

import pytest

from prefopt.config import from_dict
from prefopt.experiment import ExperimentConfig
from prefopt.reward.recipe import gold_accuracy, pairwise_metrics, reward_config, split
from prefopt.stage import StageContext, run_stage
from prefopt.gold import get_task
from prefopt.runtime.tracking import NullTracker


def _cfg(tmp_path, model, task=None, **reward):
    return from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "seed": 3,
        "task": task or {"num_sft": 10, "num_prompts": 4, "num_test_prompts": 4, "num_val_prompts": 4, "num_preferences": 48},
        "reward": {"model": str(model), "kind": "classifier", **reward},
    })


def test_pairwise_metrics_by_hand():
    # margins 1.0, -0.5, 0.25 -> accuracy 2/3, mean margin (1.0 - 0.5 + 0.25) / 3 = 0.25
    m = pairwise_metrics([2.0, 0.0, 1.0], [1.0, 0.5, 0.75])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["margin"] == pytest.approx(0.25)
    # each pair its own prompt, so the clustered SEs are the ordinary s / sqrt(n), s with n - 1: accuracy outcomes
    # 1, 0, 1 -> s^2 = (1/9 + 4/9 + 1/9) / 2 = 1/3 -> sqrt(1/3 / 3) = 1/3 (= sqrt(p (1 - p) / n) * sqrt(3/2));
    # margin deviations 0.75, -0.75, 0 -> sd = sqrt((0.5625 * 2) / 2) = 0.75 -> 0.75 / sqrt(3)
    assert m["accuracy_se"] == pytest.approx(1 / 3) == pytest.approx((2 / 9 / 3 * 3 / 2) ** 0.5)
    assert m["margin_se"] == pytest.approx(0.75 / 3 ** 0.5) and m["prompts"] == 3
    # BT loss: mean of log(1 + exp(-m)) over 1.0, -0.5, 0.25
    import math

    assert m["loss"] == pytest.approx(sum(math.log1p(math.exp(-x)) for x in (1.0, -0.5, 0.25)) / 3)
    assert pairwise_metrics([1.0], [1.0])["accuracy"] == 0.5  # a tie counts one half


def test_gold_accuracy_ignores_labels_and_gold_ties():
    task = get_task("sort")
    rows = [
        # annotator label flipped (chosen is the wrong one); the RM ranks the correct one higher: right vs gold
        {"prompt": "", "meta": {"input": "2 1"}, "chosen": "2 1", "rejected": "1 2"},
        # gold tie (both score 0): not counted
        {"prompt": "", "meta": {"input": "3 2 1"}, "chosen": "3 2 1", "rejected": "2 1 0"},
        # RM prefers the wrong one: miss
        {"prompt": "", "meta": {"input": "5 4"}, "chosen": "4 5", "rejected": "5 4"},
    ]
    assert gold_accuracy(rows, [0.0, 1.0, 0.0], [1.0, 0.0, 1.0], task) == (0.5, 2)
    assert gold_accuracy([{"prompt": "Hello", "meta": {}, "chosen": "a", "rejected": "b"}], [1.0], [0.0], task) is None


def test_split_is_seeded_and_disjoint():
    rows = [{"i": i, "prompt": f"p{i}"} for i in range(100)]
    train, val, test = split(rows, 0.1, seed=1, test_fraction=0.2)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(r["i"] for r in train + val + test) == list(range(100))
    assert split(rows, 0.1, seed=1, test_fraction=0.2) == (train, val, test)
    all_train, no_val, no_test = split(rows, 0.0, seed=1)
    assert len(all_train) == 100 and no_val == [] and no_test == []


def test_reward_config_sets_trl_defaults_explicitly(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, max_length=77, center_rewards_coefficient=0.01, learning_rate=3e-4,
               backend="trl")  # trl.RewardConfig fields apply to the TRL backend only
    ctx = StageContext(cfg=cfg, stage="reward", round=1, dir=tmp_path / "r", tracker=NullTracker())
    args = reward_config(cfg.reward, ctx)
    assert args.learning_rate == cfg.reward.learning_rate != 1e-4  # TRL's RewardConfig default is 1e-4
    assert args.bf16 is False and args.max_length == 77 and args.seed == 3
    assert not getattr(args, "activation_checkpointing", False) and not args.gradient_checkpointing
    assert args.center_rewards_coefficient == 0.01  # passthrough from the YAML section
    assert args.output_dir == str(tmp_path / "r" / "checkpoints") and args.report_to in ([], "none", ["none"])


def test_reward_stage_resumes_from_checkpoint(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, max_steps=2, save_steps=1, per_device_train_batch_size=8,
               eval_fraction=0.25, test_fraction=0.25, logging_steps=1)
    run_stage(cfg, "task")
    first = run_stage(cfg, "reward")
    d = tmp_path / "t" / "reward"
    assert first["resumed_from"] is None and first["train/pairs"] == 24 and first["eval/pairs"] == 12
    assert first["select/pairs"] == 12 and [h["step"] for h in first["select/history"]] == [1, 2]
    # the reported figures are those of the test pairs' margins the stage kept (ties count one half)
    margins = [json.loads(line)["margin"] for line in (d / "test_margins.jsonl").read_text().splitlines()]
    assert len(margins) == first["eval/pairs"] == 12
    right = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / 12
    assert first["eval/accuracy"] == pytest.approx(right) and first["eval/margin"] == pytest.approx(sum(margins) / 12)
    # 12 test pairs of 12 prompts (the task draws each input once): the clustered SE is the ordinary s / sqrt(n)
    outcomes = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    assert first["eval/prompts"] == 12
    assert first["eval/accuracy_se"] == pytest.approx(statistics.stdev(outcomes) / 12 ** 0.5)
    assert (d / "model" / "model.safetensors").exists()
    assert any("loss" in json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines())
    # killed after its last checkpoint, before saving: the rerun resumes there instead of starting over
    (d / "_DONE.json").unlink()
    import shutil

    shutil.rmtree(d / "model")
    again = run_stage(cfg, "reward")
    assert again["resumed_from"].endswith("checkpoint-2")
    # the same final weights: the same test margins, so the same accuracy and margin
    assert (again["eval/accuracy"], again["eval/margin"]) == pytest.approx((first["eval/accuracy"],
                                                                            first["eval/margin"]), abs=1e-6)
    assert (d / "model" / "model.safetensors").exists()


def test_reward_stage_lora_saves_merged_model(tmp_path, tiny_model_dir):
    from safetensors import safe_open

    from prefopt.scoring.scorer import load_scorer

    cfg = _cfg(tmp_path, tiny_model_dir, max_steps=2, per_device_train_batch_size=8, eval_fraction=0.25,
               lora={"enabled": True, "r": 4, "alpha": 8})
    run_stage(cfg, "task")
    summary = run_stage(cfg, "reward")
    model_dir = tmp_path / "t" / "reward" / "model"
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "score.weight" in keys and not any("lora" in k for k in keys)
    model = load_scorer(str(model_dir)).model  # a plain sequence classifier, as the score stage loads it
    assert model.config.num_labels == 1 and "eval/accuracy" in summary


def test_reward_stage_keeps_the_best_validation_checkpoint(tmp_path, tiny_model_dir):
    """Evaluated on the validation split every save_steps; the step with the best accuracy (ties: lower loss) is
    the saved model, bit for bit, and early stopping ends training `early_stopping_patience` evaluations later."""
    from safetensors.torch import load_file

    cfg = _cfg(tmp_path, tiny_model_dir, max_steps=8, save_steps=1, per_device_train_batch_size=8, learning_rate=3e-2,
               eval_fraction=0.25, test_fraction=0.25, early_stopping_patience=2, save_total_limit=1,
               task={"num_sft": 10, "num_prompts": 4, "num_test_prompts": 4, "num_val_prompts": 4,
                     "num_preferences": 64})
    run_stage(cfg, "task")
    summary = run_stage(cfg, "reward")
    hist = summary["select/history"]
    best = max(hist, key=lambda h: (h["accuracy"], -h["loss"], -h["step"]))
    assert summary["select/best_step"] == best["step"]
    # stopped exactly `patience` evaluations after the best one (or at max_steps)
    assert hist[-1]["step"] == min(best["step"] + 2, 8) and summary["train/steps"] == hist[-1]["step"]
    d = tmp_path / "t" / "reward"
    saved = load_file(str(d / "model" / "model.safetensors"))
    kept = load_file(str(d / "checkpoints" / f"checkpoint-{best['step']}" / "model.safetensors"))
    assert all((saved[k] == kept[k]).all() for k in kept)  # the best checkpoint survived rotation and was loaded
    assert len((d / "selection.jsonl").read_text().splitlines()) == len(hist)
    assert len((d / "test_margins.jsonl").read_text().splitlines()) == summary["eval/pairs"] == 16


@pytest.mark.slow
def test_reward_model_learns_the_gold_task_from_scratch(tmp_path):
    """A tiny *randomly initialised* Llama trained on 1,800 annotator-labelled pairs (10% label noise) ranks held-out
    pairs the way the gold score does well above chance (0.5). Half the pairs put the answer against a sampling slip
    of it, which only a model that compares digits with the input can rank; from scratch that reaches about 0.69.
    The issue's target (>= 0.8, default task, fixed seed) is checked in tests/test_quickstart.py, where the reward
    model starts from the SFT model as the quickstart configures it (0.87 there)."""
    from prefopt.data.templates import alpaca_prompt
    from prefopt.models.loading import build_tiny_llama, build_tokenizer, save_model
    from prefopt.dist.process import seed_everything
    from prefopt.io import read_jsonl

    cfg = from_dict(ExperimentConfig, {"name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"},
                                       "seed": 42, "task": {"distinct": True},  # as in the quickstart
                                       "reward": {"model": str(tmp_path / "base"), "kind": "classifier", "learning_rate": 2e-3,
                                                  "num_train_epochs": 4, "logging_steps": 50, "save_steps": 10_000}})
    run_stage(cfg, "task")
    rows = read_jsonl(tmp_path / "t" / "task" / "sft.jsonl")
    seed_everything(0)
    tok = build_tokenizer([alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in rows], vocab_size=300)
    model = build_tiny_llama(tok, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=128)
    save_model(model, tok, tmp_path / "base")
    summary = run_stage(cfg, "reward")
    assert summary["eval/gold_pairs"] >= 150
    assert summary["eval/gold_accuracy"] >= 0.65
    assert summary["eval/accuracy"] >= 0.6  # against noisy labels: ~10% of them are wrong by construction
