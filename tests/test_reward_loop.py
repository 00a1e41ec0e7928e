"""The classifier reward model in the shared training loop (`reward.backend: prefopt`), TRL's RewardTrainer
(`backend: trl`) as its oracle: the same data order, lr, seed and head init, no dropout, fp32, give the same loss
curve and the same weights; and the loop's rewards are read where the `score` stage reads the saved model."""

from __future__ import annotations

import json

import pytest
import torch

from pair_helpers import state_dict
from prefopt.config import ConfigError, from_dict
from prefopt.experiment import ExperimentConfig

TASK = {"num_sft": 10, "num_prompts": 4, "num_test_prompts": 4, "num_val_prompts": 4, "num_preferences": 48}


def _cfg(out, model, **reward):
    return from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(out), "wandb": {"mode": "disabled"}, "seed": 3, "task": TASK,
        "reward": {"model": str(model), "kind": "classifier", **reward}})


def test_pair_rewards_are_the_score_stages_reading_of_each_text(tiny_model_dir):
    """Three texts of different lengths, chosen rows then rejected rows right-padded to the longest: each reward
    equals the saved-model reading of the `score` stage (ClassifierScorer on prompt + response + EOS, each text at
    its own last token), so the head is read where it was trained."""
    from prefopt.data.templates import encode
    from prefopt.models.loading import load_reward_model, load_tokenizer
    from prefopt.preference.rewards import collate_texts, pair_rewards
    from prefopt.scoring.scorer import ClassifierScorer, reward_text

    tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    torch.manual_seed(0)
    model = load_reward_model(str(tiny_model_dir), dtype=torch.float32).eval()
    prompts = ["Sort 3 1 2\n", "Reverse the list 5 4 3 2 1 please\n", "Hi\n"]
    chosen, rejected = ["1 2 3", "1 2 3 4 5", "Hello there, friend"], ["3 2 1", "5", "no"]
    examples = [{k: encode(reward_text(p, r, tok.eos_token), tok) for k, r in (("chosen_ids", c), ("rejected_ids", j))}
                for p, c, j in zip(prompts, chosen, rejected)]
    batch = collate_texts(examples, tok.pad_token_id)
    lengths = [len(ex[k]) for k in ("chosen_ids", "rejected_ids") for ex in examples]
    assert batch["input_ids"].shape == (6, max(lengths)) and batch["attention_mask"].sum(1).tolist() == lengths
    with torch.no_grad():
        rewards = pair_rewards(model, batch)
    scored = ClassifierScorer(model, tok).score(prompts * 2, chosen + rejected, batch_size=1)
    torch.testing.assert_close(torch.cat([rewards.chosen, rewards.rejected]), torch.tensor(scored), rtol=0,
                               atol=1e-5)


def test_trainer_args_need_the_trl_backend_and_trl_a_classifier(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"reward.center_rewards_coefficient.*reward.backend=trl only"):
        _cfg(tmp_path, tiny_model_dir, center_rewards_coefficient=0.01)
    _cfg(tmp_path, tiny_model_dir, center_rewards_coefficient=0.01, backend="trl")  # accepted
    with pytest.raises(ConfigError, match=r"^reward.backend: trl is for kind classifier only"):
        _cfg(tmp_path, tiny_model_dir, kind="likelihood", backend="trl")


def _trl_step_losses(monkeypatch, seed: int, accumulation: int) -> list[float]:
    """TRL's RewardTrainer made to take the loop's batch order (its EpochShuffle as the sampler), its micro-batch
    losses recorded; returns a list that fills, while the stage runs, with the per-step means."""
    from trl import RewardTrainer

    from prefopt.preference.loop import EpochShuffle

    seen: list[float] = []
    compute_loss = RewardTrainer.compute_loss

    def recorded(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        seen.append(float((loss[0] if return_outputs else loss).detach()))
        return loss

    monkeypatch.setattr(RewardTrainer, "compute_loss", recorded)
    monkeypatch.setattr(RewardTrainer, "_get_train_sampler",
                        lambda self, ds=None: EpochShuffle(len(ds if ds is not None else self.train_dataset), seed))
    return seen


@pytest.mark.parametrize("accumulation", [1, 2])
def test_loss_curve_and_weights_equal_trl_reward_trainer(tmp_path, tiny_model_dir, monkeypatch, accumulation):
    """6 steps at lr 1e-2 (constant, clipped at 1.0) on 24 train pairs, batch 8 (or 4 x 2 accumulated): the
    reward stage on the loop and on TRL's RewardTrainer, same order, seed and head init, log the same
    Bradley-Terry loss at every step, end with the same weights, and report the same validation and test figures
    (scored from the saved models). Measured: losses and weights equal to the bit (difference 0.0), both cases."""
    from prefopt.runtime.tracking import read_metrics
    from prefopt.stage import run_stage

    reward = {"max_steps": 6, "learning_rate": 1e-2, "lr_scheduler_type": "constant", "logging_steps": 1,
              "per_device_train_batch_size": 8 // accumulation, "gradient_accumulation_steps": accumulation,
              "save_steps": 100, "eval_fraction": 0.25, "test_fraction": 0.25, "min_eval_accuracy": 0}
    runs = {}
    for backend in ("prefopt", "trl"):
        cfg = _cfg(tmp_path / backend, tiny_model_dir, backend=backend, **reward)
        run_stage(cfg, "task")
        seen = _trl_step_losses(monkeypatch, cfg.seed, accumulation) if backend == "trl" else None
        summary = run_stage(cfg, "reward")
        d = tmp_path / backend / "t" / "reward"
        losses = ([sum(seen[i:i + accumulation]) / accumulation for i in range(0, len(seen), accumulation)]
                  if seen is not None else [r["loss"] for r in read_metrics(d) if "loss" in r])
        runs[backend] = summary, losses, state_dict(d / "model")
        monkeypatch.undo()
    (ours, our_losses, our_weights), (trl, trl_losses, trl_weights) = runs["prefopt"], runs["trl"]
    assert ours["train/pairs"] == trl["train/pairs"] == 24 and ours["train/steps"] == trl["train/steps"] == 6
    assert len(our_losses) == len(trl_losses) == 6
    assert max(our_losses) - min(our_losses) > 1e-3  # 100x the tolerance below: not a flat curve
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(trl_losses), rtol=0, atol=1e-5)
    start = state_dict(tiny_model_dir)
    moved = max((w - start[k]).abs().max().item() for k, w in our_weights.items() if k in start)
    assert moved > 1e-3  # 1000x the tolerance below
    assert our_weights.keys() == trl_weights.keys() and "score.weight" in our_weights
    for k, v in our_weights.items():
        torch.testing.assert_close(v, trl_weights[k], rtol=0, atol=1e-6)
    for key in ("select/accuracy", "eval/accuracy", "eval/margin", "eval/gold_accuracy"):
        assert ours.get(key) == pytest.approx(trl.get(key), abs=1e-5), key
    meta = json.loads((tmp_path / "prefopt" / "t" / "reward" / "model" / "reward_model.json").read_text())
    assert meta["kind"] == "classifier"  # the score stage reads it as the policy's text (rm_format: auto)
