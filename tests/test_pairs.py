"""Pair strategies on hand-made scores, and the pairs stage's rows, provenance, dataset, plot and summary."""

import random

import pytest

from prefopt.config import from_dict
from prefopt.data.loaders import load_preferences
from prefopt.data.spec import DatasetSpec
from prefopt.experiment import ExperimentConfig
from prefopt.pairs.strategies import (all_pairs, best_vs_random, best_vs_worst, best_vs_z, drop_reason,
                                     select_pairs)
from prefopt.stage import run_stage
from prefopt.io import read_jsonl, write_jsonl


def test_best_vs_worst():
    assert best_vs_worst([0.1, 0.9, 0.5, -0.2]) == [(1, 3)]
    assert best_vs_worst([0.1, 0.9, 0.5, -0.2], k=3) == [(1, 3)]  # one pair per prompt whatever k
    assert best_vs_worst([0.5, 0.5, 0.5]) == []  # all tied
    assert best_vs_worst([0.5, 0.7], margin=0.2) == []  # gap 0.2 is not above the margin
    assert best_vs_worst([0.5, 0.71], margin=0.2) == [(1, 0)]
    assert best_vs_worst([0.9, 0.9, 0.1, 0.1]) == [(0, 2)]  # ties broken by the first index
    assert best_vs_worst([1.0]) == []
    # identical texts are one candidate: the duplicate "a" cannot be the rejected one of its own copy
    assert best_vs_worst([0.3, 0.3], texts=["a", "a"]) == []
    assert best_vs_worst([0.3, 0.9, 0.3], texts=["a", "b", "a"]) == [(1, 0)]


def test_best_vs_random():
    scores = [0.0, 1.0, 0.5, 0.95, 0.2]
    got = best_vs_random(scores, margin=0.1, k=2, rng=random.Random(0))
    assert len(got) == 2 and all(c == 1 for c, _ in got)
    assert {r for _, r in got} <= {0, 2, 4}  # index 3 is within the margin of the best
    assert len({r for _, r in got}) == 2
    assert sorted(r for _, r in best_vs_random(scores, margin=0.1, k=10, rng=random.Random(0))) == [0, 2, 4]
    assert best_vs_random([0.4, 0.4], k=2) == []
    # seeded: the same generator gives the same pairs
    assert best_vs_random(scores, 0.0, 2, rng=random.Random(5)) == best_vs_random(scores, 0.0, 2,
                                                                                  rng=random.Random(5))


def test_all_pairs():
    scores = [0.0, 1.0, 0.5, 0.5]
    # gaps: (1,0)=1.0, (1,2)=(1,3)=(2,0)=(3,0)=0.5; (2,3) tied -> dropped
    assert all_pairs(scores, k=10) == [(1, 0), (1, 2), (1, 3), (2, 0), (3, 0)]
    assert all_pairs(scores, k=2) == [(1, 0), (1, 2)]
    assert all_pairs(scores, margin=0.5, k=10) == [(1, 0)]
    assert all_pairs([0.2, 0.2, 0.2], k=10) == []
    with pytest.raises(ValueError, match="strategies are"):
        select_pairs("nope", scores)


def test_best_vs_z_hand_computed():
    """20 candidates: -3, 0, seventeen 1s, 2. mu = (-3 + 0 + 17 + 2) / 20 = 0.8; squared deviations 3.8^2 = 14.44,
    0.8^2 = 0.64, 17 x 0.2^2 = 0.68, 1.2^2 = 1.44, sum 17.2, variance 0.86, sigma 0.92736. mu - 2 sigma = -1.0547:
    0 is 1.0547 from it, -3 is 1.9453, so the rejected is 0 (index 1), not the worst (index 0); chosen: 2 (index 19).
    Ten candidates -3, 0, seven 1s, 2: mu 0.6, variance (12.96 + 0.36 + 7 x 0.16 + 1.96) / 10 = 1.64, sigma 1.28062;
    mu - 2 sigma = -1.9612 is nearer -3 (1.039) than 0 (1.961): the worst; at z = -1, -0.6806: 0 (0.681 vs 2.319)."""
    twenty = [-3.0, 0.0] + [1.0] * 17 + [2.0]
    assert best_vs_z(twenty) == [(19, 1)] and best_vs_worst(twenty) == [(19, 0)]
    ten = [-3.0, 0.0] + [1.0] * 7 + [2.0]
    assert best_vs_z(ten) == [(9, 0)]
    assert best_vs_z(ten, z=-1.0) == [(9, 1)] == select_pairs("best_vs_z", ten, z=-1.0)
    assert best_vs_z(ten, z=-1.0, margin=2.0) == []  # gap 2 - 0 = 2 is not above the margin
    assert best_vs_z([0.4, 0.4, 0.4]) == [] and best_vs_z([1.0]) == []
    # repeats count in mu and sigma (the policy's distribution) but are one candidate: texts a, a, b, c
    # scores 0, 0, 1, 3: mu 1, sigma sqrt((1 + 1 + 0 + 4) / 4) = 1.2247; mu - sigma = -0.2247 -> "a" (index 0)
    assert best_vs_z([0.0, 0.0, 1.0, 3.0], z=-1.0, texts=["a", "a", "b", "c"]) == [(3, 0)]


def test_rejected_z_only_with_best_vs_z():
    from prefopt.config import ConfigError

    with pytest.raises(ConfigError, match="pairs.rejected_z: is read only by strategy best_vs_z, not 'best_vs_worst'"):
        from_dict(ExperimentConfig, {"name": "x", "pairs": {"rejected_z": -1.5}})
    assert from_dict(ExperimentConfig, {"name": "x", "pairs": {"strategy": "best_vs_z", "rejected_z": -1.5}})


def test_drop_reasons():
    assert drop_reason([0.1], 0.0) == "fewer_than_2_candidates"
    assert drop_reason([0.1, 0.9], 0.0, texts=["x", "x"]) == "fewer_than_2_candidates"
    assert drop_reason([0.3, 0.3, 0.3], 0.0) == "all_tied"
    assert drop_reason([0.3, 0.35], 0.1) == "below_margin"
    assert drop_reason([0.3, 0.5], 0.1) is None


def _fake_run(tmp_path, strategy="best_vs_worst", margin=0.0, k=1):
    """generate + score shards written by hand: 4 prompts, 2 shards."""
    root = tmp_path / "t"
    gen = {"path": "/models/sft", "sha256": "gen123"}
    rm = {"path": "/models/rm", "sha256": "rm456"}
    g1 = [
        {"prompt_id": "p0", "prompt": "P0", "candidates": ["a", "bbbb", "cc"], "sampling": {"n": 3}, "seed": 7,
         "generator": gen},
        {"prompt_id": "p1", "prompt": "P1", "candidates": ["x", "y"], "sampling": {"n": 2}, "seed": 7,
         "generator": gen},
    ]
    g2 = [
        {"prompt_id": "p2", "prompt": "P2", "candidates": ["only"], "sampling": {"n": 1}, "seed": 7, "generator": gen},
        {"prompt_id": "p3", "prompt": "P3", "candidates": ["m", "nn", "ooo"], "sampling": {"n": 3},
         "seed": [13, 21, 42], "generator": gen},
    ]
    s1 = [{"prompt_id": "p0", "scores": [0.1, 0.9, 0.4], "reward_model": rm},
          {"prompt_id": "p1", "scores": [0.5, 0.5], "reward_model": rm}]
    s2 = [{"prompt_id": "p2", "scores": [0.3], "reward_model": rm},
          {"prompt_id": "p3", "scores": [2.0, -1.0, 0.5], "reward_model": rm}]
    write_jsonl(root / "generate" / "shard-00000.jsonl", g1)
    write_jsonl(root / "generate" / "shard-00001.jsonl", g2)
    write_jsonl(root / "score" / "shard-00000.jsonl", s1)
    write_jsonl(root / "score" / "shard-00001.jsonl", s2)
    cfg = from_dict(ExperimentConfig, {"name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"},
                                       "pairs": {"strategy": strategy, "margin": margin, "max_pairs_per_prompt": k}})
    return cfg, root / "pairs"


def test_pairs_stage_provenance(tmp_path):
    cfg, d = _fake_run(tmp_path)
    summary = run_stage(cfg, "pairs")
    pairs = read_jsonl(d / "pairs.jsonl")
    assert [p["prompt_id"] for p in pairs] == ["p0", "p3"]
    p0, p3 = pairs
    assert p0 == {
        "prompt_id": "p0", "prompt": "P0", "chosen": "bbbb", "rejected": "a", "chosen_index": 1,
        "rejected_index": 0, "chosen_score": 0.9, "rejected_score": 0.1, "chosen_len": 4, "rejected_len": 1,
        "generator_sha256": "gen123", "reward_model_sha256": "rm456", "seed": 7,
    }
    # one sample per seed: the chosen one's seed, the rejected one's beside it
    assert (p3["chosen"], p3["rejected"], p3["seed"], p3["rejected_seed"]) == ("m", "nn", 13, 21)

    assert summary["pairs"] == 2 and summary["prompts"] == 4 and summary["prompts_with_pairs"] == 2
    assert summary["dropped"] == {"all_tied": 1, "fewer_than_2_candidates": 1}
    assert summary["length_unit"] == "characters"  # the generator folder is not here
    assert summary["length/gap_mean"] == pytest.approx(((4 - 1) + (1 - 2)) / 2)
    assert summary["margin/mean"] == pytest.approx((0.8 + 3.0) / 2)
    assert sum(summary["margin/histogram"]["counts"]) == 2
    assert (d / "pairs_summary.png").stat().st_size > 1000
    assert (d / "summary.json").exists()

    from datasets import load_from_disk

    ds = load_from_disk(str(d / "dataset"))
    assert len(ds) == 2 and ds[0]["chosen"] == "bbbb" and ds[0]["reward_model_sha256"] == "rm456"
    # what DPO / SimPO read
    rows = load_preferences(DatasetSpec(path=str(d / "pairs.jsonl"), format="preference")).rows
    assert (rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"]) == ("P0", "bbbb", "a")


def test_pairs_stage_all_pairs_margin_k(tmp_path):
    cfg, d = _fake_run(tmp_path, strategy="all_pairs", margin=0.3, k=2)
    summary = run_stage(cfg, "pairs")
    got = [(p["prompt_id"], p["chosen_index"], p["rejected_index"]) for p in read_jsonl(d / "pairs.jsonl")]
    # p0 gaps: (1,0)=0.8, (1,2)=0.5, (2,0)=0.3; p3: (0,1)=3.0, (0,2)=1.5, (2,1)=1.5; k=2 keeps the largest
    assert got == [("p0", 1, 0), ("p0", 1, 2), ("p3", 0, 1), ("p3", 0, 2)]
    assert all(p["chosen_score"] - p["rejected_score"] > 0.3 for p in read_jsonl(d / "pairs.jsonl"))
    assert summary["pairs"] == 4
    assert summary["dropped"] == {"all_tied": 1, "fewer_than_2_candidates": 1}


def test_pairs_stage_best_vs_z(tmp_path):
    """p0 scores 0.1, 0.9, 0.4: mu 0.4667, sigma 0.3300, mu - 2 sigma = -0.193: index 0 (the worst); p3 2.0, -1.0,
    0.5: mu 0.5, sigma 1.2247, -1.949: index 1 (the worst). Three candidates: the rule and the minimum agree."""
    cfg, d = _fake_run(tmp_path, strategy="best_vs_z")
    summary = run_stage(cfg, "pairs")
    got = [(p["prompt_id"], p["chosen_index"], p["rejected_index"]) for p in read_jsonl(d / "pairs.jsonl")]
    assert got == [("p0", 1, 0), ("p3", 0, 1)]
    assert summary["rejected_z"] == -2.0 and summary["rejected_is_worst"] == 1.0


def test_pairs_margin_drops_near_ties(tmp_path):
    cfg, d = _fake_run(tmp_path, margin=1.0)
    summary = run_stage(cfg, "pairs")
    assert [p["prompt_id"] for p in read_jsonl(d / "pairs.jsonl")] == ["p3"]  # p0's best gap 0.8 <= 1.0
    assert summary["dropped"] == {"all_tied": 1, "fewer_than_2_candidates": 1, "below_margin": 1}


def test_gold_audit_hand_computed():
    """Two prompts; gold = the candidate's number, the reward model's scores disagree on one pair.

    Prompt A: gold 1, 2, 3; RM 0.1, 0.5, 0.3 -> pairs (1,2) right, (1,3) right, (2,3) wrong: 2 of 3.
    Prompt B: gold 5, 5; a tie in gold, so no pair counts and no top-1 check.
    RM accuracy 2/3; top-1: A's RM best is "2", gold best is "3" -> 0/1.
    Pairs: (3 over 1) chosen better = 1; (2 over 2) a gold tie = 1/2 -> chosen_better 0.75."""
    from prefopt.pairs.strategies import gold_audit

    def gold(example, response):
        assert example["input"] in ("a", "b")  # the scorer reads the task input from the row's meta
        return float(response)

    rows = [{"prompt_id": "A", "prompt": "A", "meta": {"input": "a"}, "candidates": ["1", "2", "3"],
             "scores": [0.1, 0.5, 0.3]},
            {"prompt_id": "B", "prompt": "B", "meta": {"input": "b"}, "candidates": ["5", "5"], "scores": [0.2, 0.1]}]
    pairs = [{"prompt_id": "A", "chosen": "3", "rejected": "1"}, {"prompt_id": "A", "chosen": "2", "rejected": "2"}]
    audit = gold_audit(rows, pairs, gold)
    assert audit["gold/rm_pairwise_accuracy"] == pytest.approx(2 / 3)
    assert audit["gold/best_is_gold_best"] == 0.0
    assert audit["gold/chosen_better"] == 0.75
