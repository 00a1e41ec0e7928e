"""Figures you can stand behind: standard errors, best-of-n, over-optimisation in words, the pairs' label-quality
estimate, and the reward-model gate that stops a run whose reward model learned nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_experiment, write_yaml
from prefopt.evaluate import metrics as M
from prefopt.evaluate.overopt import curve_warnings, verdicts
from prefopt.pairs.recipe import calibration, expected_accuracy
from prefopt.reward.gate import gate_message

REPO = Path(__file__).resolve().parents[1]


def test_mean_se_by_hand():
    # values 1, 2, 3, 6: mean 3, deviations -2 -1 0 3 -> sample var (4 + 1 + 0 + 9) / 3 = 14/3 -> SE sqrt(14/3 / 4)
    m, se = M.mean_se([1, 2, 3, 6])
    assert m == 3.0 and se == pytest.approx(math.sqrt(14 / 3 / 4))
    assert M.mean_se([5.0]) == (5.0, 0.0)
    assert M.per_prompt_means([[1, 0], [0.5]]) == [0.5, 0.5]
    assert M.per_prompt_win_rates([[1.0, 0.0]], [[0.5]]) == [0.5]


def test_best_of_n_by_hand():
    scores = [[0.1, 0.9, 0.5, 0.95], [0.3, 0.3, 0.2, 0.1]]
    assert M.best_of_n(scores, 1) == [0, 0]
    assert M.best_of_n(scores, 2) == [1, 0]  # a tie goes to the first
    assert M.best_of_n(scores, 4) == [3, 0]
    assert M.best_of_n_kl_bound(1) == 0.0 and M.best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(ValueError, match="needs 8 samples"):
        M.best_of_n(scores, 8)


def test_best_of_n_picked_by_a_reward_function(monkeypatch):
    """`evaluate.reward_fn` in place of the reward model: the evaluate stage's proxy scorer calls the function on
    every (prompt row, sample), and best-of-n keeps the function's argmax among the first n. The function here wants
    as many words as the row's `input` says: score -|words - input|, so the pick is neither the first nor the
    longest sample.
        prompt 0 (input 3): words 1 4 3 2 -> -2 -1  0 -1 -> best of 2: 1, of 4: 2
        prompt 1 (input 1): words 2 3 1 1 -> -1 -2  0  0 -> best of 2: 0, of 4: 2 (the tie with 3 goes to the first)"""
    import sys
    import types
    from types import SimpleNamespace

    from prefopt.evaluate.scorers import proxy_scorer

    mod = types.ModuleType("bon_rewards")
    mod.word_count = lambda example, response: -abs(len(response.split()) - int(example["input"]))
    monkeypatch.setitem(sys.modules, "bon_rewards", mod)
    ctx = SimpleNamespace(cfg=SimpleNamespace(task=None))
    name, score_fn, _ = proxy_scorer(ctx, SimpleNamespace(reward_fn="bon_rewards:word_count"))
    assert name == "fn:bon_rewards:word_count"

    texts = [["a", "a b c d", "a b c", "a b"], ["x y", "x y z", "x", "w"]]
    rows = [{"prompt_id": "p0", "instruction": "Write words.", "input": "3"},
            {"prompt_id": "p1", "instruction": "Write words.", "input": "1"}]
    samples = {"rendered": ["### Instruction: Write words. 3", "### Instruction: Write words. 1"],
               "completions": [[SimpleNamespace(text=t) for t in comps] for comps in texts]}
    scores = score_fn(samples, rows)
    assert scores == [[-2.0, -1.0, 0.0, -1.0], [-1.0, -2.0, 0.0, 0.0]]
    assert M.best_of_n(scores, 1) == [0, 0]
    assert M.best_of_n(scores, 2) == [1, 0]
    assert M.best_of_n(scores, 4) == [2, 2]
    for n in (2, 4):
        for i, j in enumerate(M.best_of_n(scores, n)):
            assert scores[i][j] == max(scores[i][:n])  # the reward function's argmax among the first n


def test_verdicts_say_when_the_reward_model_is_exploited():
    figs = {
        "sft": {"gold_gain": 0.0, "gold_gain_se": 0.0, "win_rate_vs_sft": 0.5, "win_rate_vs_sft_se": 0.0},
        # the case: RM win 0.65 (SE 0.02) while gold falls 0.13 (SE 0.03)
        "dpo": {"gold_gain": -0.13, "gold_gain_se": 0.03, "win_rate_vs_sft": 0.65, "win_rate_vs_sft_se": 0.02},
        "simpo": {"gold_gain": 0.01, "gold_gain_se": 0.02, "win_rate_vs_sft": 0.6, "win_rate_vs_sft_se": 0.02},
        "ppo": {"gold_gain": 0.2, "gold_gain_se": 0.02, "win_rate_vs_sft": 0.7, "win_rate_vs_sft_se": 0.02},
        "weak": {"gold_gain": -0.1, "gold_gain_se": 0.02, "win_rate_vs_sft": 0.48, "win_rate_vs_sft_se": 0.03},
    }
    out = verdicts(figs, "sft")
    assert len(out) == 3
    assert out[0].startswith("dpo: WORSE than sft by gold (-0.130 ± 0.030) while the reward model prefers it "
                             "(RM win rate 0.650 ± 0.020)")
    assert out[1].startswith("simpo: the reward model prefers it to sft") and "no significant change" in out[1]
    assert out[2] == "weak: worse than sft by gold (-0.100 ± 0.020)"
    assert verdicts(figs, None) == []


def test_curve_warnings_find_reward_up_gold_down():
    rising = [{"step": 0, "kl": 0.0, "gold": 0.60, "gold_se": 0.02, "rm": 0.0},
              {"step": 50, "kl": 1.0, "gold": 0.75, "gold_se": 0.02, "rm": 0.5},
              {"step": 100, "kl": 3.0, "gold": 0.55, "gold_se": 0.02, "rm": 0.9}]
    fine = [{"step": 0, "kl": 0.0, "gold": 0.6, "gold_se": 0.02, "rm": 0.0},
            {"step": 50, "kl": 1.0, "gold": 0.8, "gold_se": 0.02, "rm": 0.5},
            {"step": 100, "kl": 2.0, "gold": 0.79, "gold_se": 0.02, "rm": 0.6}]  # within noise of the peak
    out = curve_warnings({"ppo": rising, "dpo": fine})
    assert out == ["ppo: over-optimisation: from step 50 to step 100 the reward-model score rose 0.500 -> 0.900 while "
                   "gold fell 0.750 -> 0.550 (KL 1.00 -> 3.00); stop earlier or raise the KL penalty, choosing on "
                   "validation prompts"]


def test_label_quality_calibration_by_hand():
    # |margins| 0.1 0.2 0.3 0.4 | 1 2 3 4 in two bins; right in 2 of the small four, 4 of the large four
    margins = [0.1, -0.2, 0.3, -0.4, 1.0, 2.0, 3.0, 4.0]
    correct = [m > 0 for m in margins]
    table = calibration(margins, correct, bins=2)
    assert table == [(0.4, 0.5), (float("inf"), 1.0)]
    assert expected_accuracy(table, 0.05) == 0.5 and expected_accuracy(table, 0.41) == 1.0


def test_estimate_warning_when_the_gold_audit_disagrees():
    from prefopt.pairs.recipe import estimate_warning

    # lookup's figures: estimated 0.924, audit 0.668 -> said, as an upper bound; within 0.1 -> nothing
    msg = estimate_warning({"label_quality/estimated_accuracy": 0.924, "gold/chosen_better": 0.668})
    assert msg.startswith("the label-quality estimate (0.924) and the gold audit (0.668) disagree by more than 0.1")
    assert "worse" in msg and "upper bound" in msg
    assert estimate_warning({"label_quality/estimated_accuracy": 0.99, "gold/chosen_better": 0.993}) is None
    assert estimate_warning({"label_quality/estimated_accuracy": 0.9}) is None  # no gold scorer: nothing to compare


def test_gate_message():
    s = {"eval/accuracy": 0.556, "eval/accuracy_se": 0.025, "eval/pairs": 400}
    msg = gate_message(s, 0.65)
    assert msg.startswith("reward model gate: held-out pairwise accuracy 0.556 ± 0.025 on 400 held-out pairs is below "
                          "reward.min_eval_accuracy=0.65: pairs built from its scores would be little better than random")
    assert "\n" not in msg and "--reward.min_eval_accuracy=0" in msg
    assert gate_message(s, 0.0) is None and gate_message({**s, "eval/accuracy": 0.75}, 0.65) is None
    # above the floor but not beyond noise: 0.680 - 1.96 * 0.023 = 0.635 < 0.65 (the lookup task's reward model)
    near = gate_message({**s, "eval/accuracy": 0.680, "eval/accuracy_se": 0.023}, 0.65)
    assert "0.680 ± 0.023 on 400 held-out pairs is not above reward.min_eval_accuracy=0.65 beyond noise " \
           "(95% interval down to 0.635)" in near
    assert gate_message({**s, "eval/accuracy": 0.70, "eval/accuracy_se": 0.02}, 0.65) is None  # 0.661 >= 0.65
    assert gate_message({"eval/accuracy": 0.66}, 0.65) is None  # no SE recorded: the point estimate


@pytest.mark.slow
def test_gate_stops_a_run_whose_reward_model_learned_random_labels(tmp_path):
    """Labels drawn at random (annotator noise 0.5): `prefopt run` stops after the reward stage with exit code 5
    and the one-line message, before sampling candidates and any stage that uses the reward model; the reward
    stage's outputs stay."""
    exp = tiny_experiment(tmp_path, task={"annotator_noise": 0.5, "num_preferences": 600},
                          reward={"max_steps": 30, "save_steps": 10, "test_fraction": 0.3, "learning_rate": 1e-3,
                                  "min_eval_accuracy": 0.65})  # the default (tiny_experiment turns it off)
    path = write_yaml(tmp_path / "e.yaml", exp)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    res = subprocess.run([sys.executable, "-m", "prefopt", "run", str(path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    root = tmp_path / "runs" / "tiny"
    summary = json.loads((root / "reward" / "summary.json").read_text())
    assert res.returncode == 5, res.stderr[-2000:]
    assert summary["eval/accuracy"] < 0.65 and summary["eval/pairs"] == 180
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"prefopt: reward model gate ({root / 'reward'}): held-out pairwise accuracy "
                           f"{summary['eval/accuracy']:.3f} ± ")
    assert "before sampling candidates" in last
    for stage in ("generate", "score", "pairs", "dpo", "simpo", "ppo", "evaluate"):  # no candidates sampled either
        assert not (root / stage).exists(), stage
    assert (root / "reward" / "model" / "model.safetensors").exists()
    # the gate off: the same command goes on past it
    res = subprocess.run([sys.executable, "-m", "prefopt", "run", str(path), "--reward.min_eval_accuracy=0",
                          "--stages=[task,base,sft,reward,generate,score]"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (root / "score" / "_DONE.json").exists()
