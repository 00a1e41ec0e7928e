"""Reward-model splits by prompt and standard errors clustered by prompt (issue 21 item 5): a preference file with
several pairs per prompt never puts one prompt in two splits, and the held-out accuracy's SE counts prompts, not
pairs."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from prefopt.config import ConfigError
from prefopt.reward.recipe import clustered_se, pairwise_metrics, split


def _rows(n_prompts: int, per_prompt: int) -> list[dict]:
    return [{"prompt": f"Sort {p} 3 1", "chosen": f"1 3 {p} #{k}", "rejected": f"3 1 {p} #{k}"}
            for p in range(n_prompts) for k in range(per_prompt)]


def _prompts(rows: list[dict]) -> set[str]:
    return {r["prompt"] for r in rows}


def test_three_pairs_per_prompt_never_cross_splits():
    """30 prompts x 3 pairs, test 0.2 and validation 0.1 of the prompts: 6 and 3 prompts with all 3 of their
    pairs, 21 for training; the three prompt sets are disjoint and every row is in one part."""
    rows = _rows(30, 3)
    train, val, test = split(rows, 0.1, seed=7, test_fraction=0.2)
    assert (len(_prompts(test)), len(_prompts(val)), len(_prompts(train))) == (6, 3, 21)
    assert (len(test), len(val), len(train)) == (18, 9, 63)
    assert not (_prompts(train) & _prompts(val) or _prompts(train) & _prompts(test) or _prompts(val) & _prompts(test))
    assert sorted(map(json.dumps, train + val + test)) == sorted(map(json.dumps, rows))
    assert split(rows, 0.1, seed=7, test_fraction=0.2) == (train, val, test)  # seeded
    assert split(rows, 0.1, seed=8, test_fraction=0.2) != (train, val, test)
    # the row split this replaced, on the same file, put prompts in two parts: what the check above would catch
    old = list(rows)
    random.Random(7).shuffle(old)
    assert _prompts(old[:18]) & _prompts(old[27:])


def test_one_pair_per_prompt_splits_as_the_row_split_did():
    """With one pair per prompt the grouped split is the row split it replaced: the same shuffle, the same parts
    (so runs on the built-in tasks, one pair per input, keep their splits)."""
    rows = _rows(50, 1)
    old = list(rows)
    random.Random(3).shuffle(old)
    assert split(rows, 0.1, seed=3, test_fraction=0.2) == (old[15:], old[10:15], old[:10])


def test_a_split_with_fewer_than_two_prompts_is_refused():
    """8 prompts x 3 pairs: test_fraction 0.1 gives 1 prompt, an error naming the test split and a fraction that
    gives 2 (0.25); the validation split the same; fractions leaving 1 prompt to train are refused too."""
    rows = _rows(8, 3)
    with pytest.raises(ConfigError) as e:
        split(rows, 0.25, seed=0, test_fraction=0.1)
    msg = str(e.value)
    assert msg.startswith("reward.test_fraction=0.1 puts 1 of 8 distinct prompts in the test split, which needs at "
                          "least 2") and "reward.test_fraction=0.25 or more, or more preference data" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match=r"^reward\.eval_fraction=0\.05 puts 0 of 8 distinct prompts in the "
                                          r"validation split.*reward\.eval_fraction=0\.25 or more"):
        split(rows, 0.05, seed=0, test_fraction=0.25)
    train, val, test = split(rows, 0.25, seed=0, test_fraction=0.25)  # the suggested fraction works
    assert (len(_prompts(train)), len(_prompts(val)), len(_prompts(test))) == (4, 2, 2)
    with pytest.raises(ConfigError, match=r"^reward\.eval_fraction=0\.4 and reward\.test_fraction=0\.4 leave 1 of "
                                          r"5 prompts in the train split, which needs at least 2: give more "
                                          r"preference data or lower the fractions"):
        split(_rows(5, 2), 0.4, seed=0, test_fraction=0.4)
    with pytest.raises(ConfigError, match=r"puts 1 of 3 distinct prompts.*use more preference data"):
        split(_rows(3, 4), 0.0, seed=0, test_fraction=0.3)
    assert split(_rows(3, 4), 0.0, seed=0)[1:] == ([], [])  # no held-out split asked for: nothing to refuse


def test_clustered_se_by_hand():
    """Accuracy outcomes by prompt A: 1, 1, 0; B: 1, 0.5 (a tie); C: 0 -> n = 6, mean 3.5/6 = 7/12. Residual sums
    per prompt: A 2 - 3 * 7/12 = 1/4, B 1.5 - 2 * 7/12 = 1/3, C -7/12; squares 9/144 + 16/144 + 49/144 = 74/144;
    times G/(G-1) = 3/2 -> 37/48; SE = sqrt(37/48) / 6 = 0.14633. Margins A: 2, 1, -1; B: 3, 0; C: -1 -> mean 2/3,
    residual sums 0, 5/3, -5/3 -> 50/9 * 3/2 = 25/3 -> SE = sqrt(25/3) / 6 = 5 / (6 sqrt 3)."""
    prompts = ["A", "A", "A", "B", "B", "C"]
    margins = [2.0, 1.0, -1.0, 3.0, 0.0, -1.0]
    assert clustered_se([1, 1, 0, 1, 0.5, 0], prompts) == pytest.approx(math.sqrt(37 / 48) / 6)
    m = pairwise_metrics(margins, [0.0] * 6, prompts)
    assert m["accuracy"] == pytest.approx(7 / 12) and m["accuracy_se"] == pytest.approx(math.sqrt(37 / 48) / 6)
    assert m["margin_se"] == pytest.approx(5 / (6 * math.sqrt(3))) and (m["pairs"], m["prompts"]) == (6, 3)
    # the same pairs taken as independent: the ordinary s / sqrt(n) = sqrt(174/144 / 5) / sqrt(6), another figure
    assert pairwise_metrics(margins, [0.0] * 6)["accuracy_se"] == pytest.approx(
        statistics.stdev([1, 1, 0, 1, 0.5, 0]) / math.sqrt(6))
    assert math.isnan(clustered_se([1.0, 0.0], ["A", "A"]))  # one prompt: no SE over prompts


def test_clustered_se_with_one_pair_per_prompt_is_the_ordinary_se():
    """G = n: sqrt(n/(n-1) * sum (x - mean)^2) / n = s / sqrt(n) with s the n - 1 sample sd; for 0/1 outcomes that
    is the binomial sqrt(p (1 - p) / n) times the factor sqrt(n / (n - 1))."""
    rng = random.Random(0)
    xs = [rng.gauss(0.3, 1.0) for _ in range(40)]
    assert clustered_se(xs, list(range(40))) == pytest.approx(statistics.stdev(xs) / math.sqrt(40), rel=1e-12)
    hits = [1.0] * 27 + [0.0] * 13
    p = 27 / 40
    assert clustered_se(hits, [f"p{i}" for i in range(40)]) == pytest.approx(
        math.sqrt(p * (1 - p) / 40) * math.sqrt(40 / 39), rel=1e-12)


def test_repeated_pairs_count_once():
    """Each prompt's outcome repeated 3 times (pairs of one prompt that always agree): the clustered SE is the SE
    over the 20 prompts, not the sqrt(3)-times smaller one a count of 60 independent pairs would give."""
    rng = random.Random(1)
    per_prompt = [float(rng.random() < 0.7) for _ in range(20)]
    xs = [x for x in per_prompt for _ in range(3)]
    prompts = [g for g in range(20) for _ in range(3)]
    over_prompts = statistics.stdev(per_prompt) / math.sqrt(20)
    assert clustered_se(xs, prompts) == pytest.approx(over_prompts, rel=1e-12)
    assert clustered_se(xs, list(range(60))) < 0.6 * over_prompts


def test_gate_uses_the_clustered_se():
    """The gate reads `eval/accuracy_se` (the clustered SE) and says it is clustered when the prompts are known:
    0.70 with SE 0.03 over 40 prompts -> 0.70 - 1.96 * 0.03 = 0.641 < 0.65 stops; the ordinary SE of the same
    pairs (0.015) would have passed it (0.671)."""
    from prefopt.reward.gate import gate_message, lower_bound

    s = {"eval/accuracy": 0.70, "eval/accuracy_se": 0.03, "eval/pairs": 120, "eval/prompts": 40}
    assert lower_bound(s) == pytest.approx(0.70 - 1.96 * 0.03)
    msg = gate_message(s, 0.65)
    assert "0.700 ± 0.030 on 120 held-out pairs of 40 prompts (standard error clustered by prompt) is not above " \
           "reward.min_eval_accuracy=0.65 beyond noise (95% interval down to 0.641)" in msg
    assert gate_message({**s, "eval/accuracy_se": 0.015}, 0.65) is None


def test_reward_stage_splits_and_reports_by_prompt(tmp_path, tiny_model_dir):
    """The reward stage on a file of 16 prompts x 3 pairs: the test split holds whole prompts (48 rows -> 4
    prompts, 12 pairs), the summary records the prompts, and its SE is the clustered SE of the test margins
    (each prompt's 3 pairs lie together in the split's order)."""
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.stage import run_stage

    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(16, 3)))
    cfg = from_dict(ExperimentConfig, {
        "name": "s", "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"}, "stages": ["reward"],
        "reward": {"model": str(tiny_model_dir), "kind": "classifier", "dataset": {"path": str(path)},
                   "max_steps": 1, "save_steps": 1, "per_device_train_batch_size": 8, "eval_fraction": 0.125,
                   "test_fraction": 0.25, "max_length": 64, "min_eval_accuracy": 0}})
    summary = run_stage(cfg, "reward")
    assert (summary["train/pairs"], summary["select/pairs"], summary["eval/pairs"]) == (30, 6, 12)
    assert summary["eval/prompts"] == 4
    margins = [json.loads(line)["margin"] for line in
               (tmp_path / "runs" / "s" / "reward" / "test_margins.jsonl").read_text().splitlines()]
    outcomes = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    assert summary["eval/accuracy_se"] == pytest.approx(clustered_se(outcomes, [i // 3 for i in range(12)]))
    assert summary["eval/margin_se"] == pytest.approx(clustered_se(margins, [i // 3 for i in range(12)]))
