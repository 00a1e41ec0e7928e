"""The likelihood reward model (reward.kind: likelihood): r = beta * mean log p(y|x), trained with Bradley-Terry.

By hand: the reward and its loss. Consistency: what the scorer reads (score, ppo, evaluate) is what the preference
loop trained, token for token. The stage: validation selection, the saved folder, the gate's figure."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prefopt.config import from_dict
from prefopt.experiment import ExperimentConfig
from prefopt.reward.loss import likelihood_objective as objective
from prefopt.scoring.likelihood import META, LikelihoodScorer, likelihood_reward, read_meta
from prefopt.stage import run_stage


def test_likelihood_reward_by_hand():
    # sums -2 over 2 tokens and -6 over 3 tokens at beta 2: 2 * -1 = -2 and 2 * -2 = -4; length 0 gives 0
    r = likelihood_reward(torch.tensor([-2.0, -6.0, 0.0]), torch.tensor([2, 3, 0]), beta=2.0)
    assert r.tolist() == pytest.approx([-2.0, -4.0, 0.0])


def test_objective_is_bradley_terry_on_the_likelihood_rewards():
    from prefopt.preference.loop import PairLogps

    pi = PairLogps(torch.tensor([-2.0, -3.0]), torch.tensor([-6.0, -1.0]), torch.tensor([2, 3]), torch.tensor([3, 1]))
    loss, m = objective(beta=2.0)(pi)
    # rewards: chosen -2, -2; rejected -4, -2 -> margins 2, 0 -> loss mean(log(1 + e^-2), log 2)
    assert float(loss) == pytest.approx((math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2, abs=1e-6)
    assert float(m["rewards/margins"]) == pytest.approx(1.0) and float(m["rewards/accuracies"]) == pytest.approx(0.5)


def test_scorer_reads_what_the_loop_trains(tiny_model_dir):
    """The scorer's reward of (prompt, response) equals beta * (the preference loop's summed log-prob / length), and
    a direct forward of BOS + prompt + response + EOS by hand."""
    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.preference.batching import collate
    from prefopt.training.forward import pair_logps
    from prefopt.preference.data import tokenize_pairs

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), dtype="float32").eval()
    rows = [{"prompt": "### Instruction:\nSort\n\n### Response:\n", "chosen": "1 2 3", "rejected": "3 1"},
            {"prompt": "Human: hello there Assistant:", "chosen": " hi", "rejected": " how can I help you today?"}]
    scorer = LikelihoodScorer(model, tok, beta=1.5)
    got = scorer.score([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows],
                       batch_size=3, max_length=64)
    with torch.no_grad():
        sums, lengths = pair_logps(model, collate(tokenize_pairs(rows, tok, 64), tok.pad_token_id, 64, "padded"))
    assert got == pytest.approx((1.5 * sums / lengths).tolist(), abs=1e-5)
    # by hand for the first chosen answer
    p_ids = tok(rows[0]["prompt"])["input_ids"]
    full = tok(rows[0]["prompt"] + rows[0]["chosen"] + tok.eos_token)["input_ids"]
    assert full[:len(p_ids)] == p_ids and p_ids[0] == tok.bos_token_id and full.count(tok.bos_token_id) == 1
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0, :-1], -1)
    targets = list(range(len(p_ids), len(full)))
    by_hand = sum(float(logp[t - 1, full[t]]) for t in targets) / len(targets)
    assert got[0] == pytest.approx(1.5 * by_hand, abs=1e-5)


def test_bad_meta_is_named(tmp_path):
    (tmp_path / META).write_text('{"kind": "likelihood"}')
    with pytest.raises(ValueError, match="reward_model.json.*beta"):
        read_meta(tmp_path)


def test_reward_stage_likelihood_keeps_the_best_checkpoint_and_scores_as_the_score_stage(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from prefopt.scoring.scorer import load_scorer

    cfg = from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "seed": 3,
        "task": {"num_sft": 10, "num_prompts": 4, "num_test_prompts": 4, "num_val_prompts": 4, "num_preferences": 64},
        "reward": {"model": str(tiny_model_dir), "kind": "likelihood", "beta": 2.0, "max_steps": 6, "save_steps": 1,
                   "learning_rate": 3e-2, "per_device_train_batch_size": 8, "eval_fraction": 0.25,
                   "test_fraction": 0.25, "early_stopping_patience": 2, "logging_steps": 1, "max_length": 128}})
    run_stage(cfg, "task")
    summary = run_stage(cfg, "reward")
    d = tmp_path / "t" / "reward"
    hist = summary["select/history"]
    best = max(hist, key=lambda h: (h["accuracy"], -h["loss"], -h["step"]))
    assert summary["kind"] == "likelihood" and summary["select/best_step"] == best["step"]
    assert hist[-1]["step"] == min(best["step"] + 2, 6) == summary["train/steps"]
    saved = load_file(str(d / "model" / "model.safetensors"))
    kept = load_file(str(d / "checkpoints" / f"checkpoint-{best['step']}" / "model.safetensors"))
    assert saved.keys() == kept.keys() and all((saved[k] == kept[k]).all() for k in kept)
    assert json.loads((d / "model" / META).read_text())["beta"] == 2.0
    # the score stage's scorer gives the reported test figure back
    scorer = load_scorer(str(d / "model"))
    assert scorer.kind == "likelihood"
    margins = [json.loads(line)["margin"] for line in (d / "test_margins.jsonl").read_text().splitlines()]
    assert len(margins) == summary["eval/pairs"] == 16
    acc = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
    assert summary["eval/accuracy"] == pytest.approx(acc)
    assert (d / "model" / "config.json").exists() and "score.weight" not in saved  # a causal LM, no head
