"""Replicates: seeded stages once per seed, shared stages once, the table over seeds, Holm's correction by hand."""

from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_experiment, write_yaml
from prefopt.config import ConfigError, from_dict
from prefopt.experiment import load_config
from prefopt.experiment import ExperimentConfig, for_seed, replicated_stage, stage_dir
from prefopt.analysis.replicates import aggregate, holm, paired_difference, seeds_needed, t_cdf, t_quantile


def test_holm_adjusted_p_values_by_hand():
    """p = (0.01, 0.04, 0.03, 0.005), m = 4. Sorted: 0.005, 0.01, 0.03, 0.04.
    step 1: 4 x 0.005 = 0.02; step 2: 3 x 0.01 = 0.03; step 3: 2 x 0.03 = 0.06; step 4: 1 x 0.04 = 0.04, raised to
    the running maximum 0.06. In input order: (0.03, 0.06, 0.06, 0.02). A plain Bonferroni would give 0.04 for
    the first and 0.16 for the second; uncorrected, three of four are below 0.05, after Holm one is."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-12)
    # capped at 1: 3 x 0.5 = 1.5 -> 1; then max(1, 2 x 0.6) = 1; and 1 x 0.7 -> 1
    assert holm([0.6, 0.5, 0.7]) == pytest.approx([1.0, 1.0, 1.0])
    # 3 x 0.001 = 0.003, 2 x 0.02 = 0.04, 1 x 0.3 = 0.3
    assert holm([0.3, 0.001, 0.02]) == pytest.approx([0.3, 0.003, 0.04])


def test_student_t_against_closed_forms():
    """df = 1 is Cauchy: F(t) = 1/2 + atan(t)/pi. df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so the 0.975 quantile
    solves t / sqrt(2 + t^2) = 0.95: t = 0.95 sqrt(2 / (1 - 0.95^2)) = 4.302653."""
    for t in (-3.0, -0.4, 0.0, 1.0, 7.5):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95 ** 2)), abs=1e-9)
    assert t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-6)  # tables
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # the normal's


def test_paired_difference_by_hand():
    """a = (0.90, 0.80, 0.85), b = (0.70, 0.70, 0.70): d = (0.20, 0.10, 0.15), mean 0.15, sd 0.05, se 0.05 / sqrt 3
    = 0.028868; t = 5.196 on 2 df: p = 1 - t / sqrt(2 + t^2) = 1 - 5.196 / 5.385 = 0.03510; the interval
    0.15 ± 4.302653 x 0.028868 = 0.15 ± 0.12421."""
    r = paired_difference([0.90, 0.80, 0.85], [0.70, 0.70, 0.70])
    assert r["diff"] == pytest.approx(0.15) and r["sd"] == pytest.approx(0.05)
    assert r["se"] == pytest.approx(0.05 / math.sqrt(3))
    t = 0.15 / (0.05 / math.sqrt(3))
    assert r["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-10)
    assert r["p"] == pytest.approx(0.03510, abs=1e-4)
    assert r["ci"] == pytest.approx([0.15 - 0.124213, 0.15 + 0.124213], abs=1e-5)


def test_seeds_needed_by_hand():
    """sd 0.05, difference 0.05: n = 9 gives t(.975, 8) + t(.8, 8) = 2.306 + 0.889 = 3.195 > sqrt 9 = 3; n = 10
    gives 2.262 + 0.883 = 3.145 <= sqrt 10 = 3.162: 10 seeds. Half the sd: n = 4 gives 3.182 + 0.978 = 4.160 >
    2 sqrt 4 = 4; n = 5 gives 2.776 + 0.941 = 3.717 <= 2 sqrt 5 = 4.472: 5 seeds."""
    assert seeds_needed(0.05, 0.05) == 10
    assert seeds_needed(0.025, 0.05) == 5


def test_aggregate_figures_and_verdicts_by_hand():
    """Three seeds, baseline sft and two methods. gold: sft (0.70, 0.72, 0.68), dpo (0.90, 0.93, 0.90), simpo
    (0.71, 0.74, 0.70). dpo - sft: d = (0.20, 0.21, 0.22), mean 0.21, sd 0.01, t = 36.37 on 2 df, p = 1 - t / sqrt(2 +
    t^2) = 0.000755; simpo - sft: d = (0.01, 0.02, 0.02), sd 0.005774, t = 5.0, p = 0.03775; dpo - simpo: d = (0.19,
    0.19, 0.20), sd 0.005774, t = 57.16, p = 0.000306. Holm over 3: 3 x 0.000306 = 0.000918, 2 x 0.000755 = 0.00151,
    1 x 0.03775: dpo beats both, and simpo's +0.017 over sft, p 0.038 alone, stays resolved (0.038 < 0.05)."""
    figs = {"sft": (0.70, 0.72, 0.68), "dpo": (0.90, 0.93, 0.90), "simpo": (0.71, 0.74, 0.70)}
    summaries = {s: {"baseline": "sft", "num_prompts": 10, "split": "test",
                     "policies": {p: {"gold_score": v[i], "gold_score_se": 0.01 * (i + 1)} for p, v in figs.items()}}
                 for i, s in enumerate((7, 8, 9))}
    agg = aggregate(summaries)
    sft = agg["policies"]["sft"]["gold_score"]
    assert sft["mean"] == pytest.approx(0.70) and sft["sd_seeds"] == pytest.approx(0.02)
    assert sft["se_seeds"] == pytest.approx(0.02 / math.sqrt(3))
    assert sft["se_within"] == pytest.approx(math.sqrt((0.01 ** 2 + 0.02 ** 2 + 0.03 ** 2) / 3))
    gold = {(c["a"], c["b"]): c for c in agg["comparisons"] if c["figure"] == "gold_score"}
    assert set(gold) == {("dpo", "sft"), ("simpo", "sft"), ("dpo", "simpo")}

    def p2(t):
        return 1 - t / math.sqrt(2 + t * t)

    expect = {("dpo", "sft"): p2(0.21 / (0.01 / math.sqrt(3))),
              ("simpo", "sft"): p2((0.05 / 3) / (0.0057735 / math.sqrt(3))),
              ("dpo", "simpo"): p2((0.58 / 3) / (0.0057735 / math.sqrt(3)))}
    for k, p in expect.items():
        assert gold[k]["p"] == pytest.approx(p, rel=1e-3)
    assert gold[("dpo", "simpo")]["p_holm"] == pytest.approx(3 * expect[("dpo", "simpo")], rel=1e-3)
    assert gold[("dpo", "sft")]["p_holm"] == pytest.approx(2 * expect[("dpo", "sft")], rel=1e-3)
    assert gold[("simpo", "sft")]["p_holm"] == pytest.approx(expect[("simpo", "sft")], rel=1e-3)
    assert [gold[k]["verdict"] for k in expect] == ["dpo better", "simpo better", "dpo better"]
    # one seed less: simpo - sft has d = (0.01, 0.02), t = 3 on 1 df, p = 0.205: not resolved
    agg2 = aggregate({s: summaries[s] for s in (7, 8)})
    two = {(c["a"], c["b"]): c for c in agg2["comparisons"] if c["figure"] == "gold_score"}
    assert two[("simpo", "sft")]["p"] == pytest.approx(1 - 2 * math.atan(3) / math.pi, abs=1e-9)
    assert two[("simpo", "sft")]["verdict"] == "not resolved"


@pytest.mark.parametrize("extra, message", [
    ({"replicates": 0}, "replicates: must be >= 1, got 0"),
    ({"seeds": [3, 4, 3]}, "seeds: repeats seed 3"),
    ({"seeds": [3, 4], "replicates": 3}, "replicates: is 3 but seeds names 2"),
    ({"replicates": 2, "replicate_stages": ["sft", "nope"]}, "replicate_stages: names unknown stage(s) ['nope']"),
])
def test_bad_replicates_are_config_errors(extra, message):
    with pytest.raises(ConfigError) as e:
        from_dict(ExperimentConfig, {"name": "x", **extra})
    assert message in str(e.value)


def test_which_stages_run_per_seed():
    """dpo/simpo/ppo/evaluate are replicated, and whatever reads them; with sft replicated, generate, score and
    pairs follow (their inputs depend on the seed); nothing is replicated without replicates."""
    cfg = from_dict(ExperimentConfig, {"name": "x", "seed": 5, "replicates": 3,
                                       "evaluate": {"best_of_n": [1, 4], "checkpoints": True}})
    assert cfg.seed_list == [5, 6, 7]
    per_seed = [s for s in cfg.stages if replicated_stage(cfg, s)]
    assert per_seed == ["dpo", "simpo", "ppo", "evaluate"]
    c6 = for_seed(cfg, 6)
    assert stage_dir(c6, "dpo") == cfg.root / "seed-6" / "dpo" and stage_dir(c6, "pairs") == cfg.root / "pairs"
    assert c6.evaluate.seed != cfg.evaluate.seed != for_seed(cfg, 7).evaluate.seed  # its own evaluation samples
    c5 = for_seed(cfg, 5)  # the first seed draws the curves and best-of-n; the others the final policies only
    assert (c5.evaluate.best_of_n, c5.evaluate.checkpoints) == ([1, 4], True)
    assert (c6.evaluate.best_of_n, c6.evaluate.checkpoints) == ([], False) and cfg.evaluate.best_of_n == [1, 4]
    wide = from_dict(ExperimentConfig, {"name": "x", "seeds": [1, 9], "replicate_stages": ["sft", "reward"]})
    assert [s for s in wide.stages if not replicated_stage(wide, s)] == ["task", "base"]
    one = from_dict(ExperimentConfig, {"name": "x"})
    assert not any(replicated_stage(one, s) for s in one.stages) and stage_dir(one, "dpo") == one.root / "dpo"


@pytest.mark.slow
def test_tiny_experiment_with_two_replicates(tmp_path, capsys):
    """Shared stages run once, seeded stages once per seed with different results, the table over seeds (mean,
    across-seed SE, paired differences, verdicts), a rerun skips everything, and a stage run alone needs its seed."""
    from prefopt import cli
    from prefopt.pipeline import launch_command, run_experiment

    stages = ["task", "base", "sft", "reward", "generate", "score", "pairs", "dpo", "simpo", "evaluate"]
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(
        tmp_path, stages=stages, replicates=2,
        evaluate={"policies": {"sft": "stage:sft", "dpo": "stage:dpo", "simpo": "stage:simpo"}}))
    cfg = load_config(exp)
    run_experiment(cfg)
    out = capsys.readouterr().out
    root = tmp_path / "runs" / "tiny"
    timings = json.loads((root / "timings.json").read_text())
    for s in ["task", "base", "sft", "reward", "generate", "score", "pairs"]:
        assert f"{s}@1" in timings and (root / s / "_DONE.json").exists()
        assert out.count(f"[prefopt] {s}: running") == 1
    assert not (root / "dpo").exists()
    for s in ["dpo", "simpo", "evaluate"]:
        assert {k for k in timings if k.startswith(f"{s}@")} == {f"{s}@1@seed-1", f"{s}@1@seed-2"}
        assert (root / "seed-1" / s / "_DONE.json").exists() and (root / "seed-2" / s / "_DONE.json").exists()
    weights = [json.loads((root / f"seed-{k}" / "dpo" / "_DONE.json").read_text())["outputs_digest"] for k in (1, 2)]
    assert weights[0] != weights[1]  # another seed, another data order: another model
    ev = {k: json.loads((root / f"seed-{k}" / "evaluate" / "summary.json").read_text())["policies"] for k in (1, 2)}
    assert ev[1]["dpo"]["rm_score"] != ev[2]["dpo"]["rm_score"]
    assert json.loads((root / "seed-2" / "dpo" / "summary.json").read_text())["replicate_seed"] == 2

    agg = json.loads((root / "replicates.json").read_text())
    assert agg["seeds"] == [1, 2] and agg["missing_seeds"] == []
    rm = agg["policies"]["dpo"]["rm_score"]
    x1, x2 = ev[1]["dpo"]["rm_score"], ev[2]["dpo"]["rm_score"]
    assert rm["mean"] == pytest.approx((x1 + x2) / 2) and rm["se_seeds"] == pytest.approx(abs(x1 - x2) / 2)
    assert rm["se_within"] == pytest.approx(math.sqrt((ev[1]["dpo"]["rm_score_se"] ** 2
                                                       + ev[2]["dpo"]["rm_score_se"] ** 2) / 2))
    c = next(c for c in agg["comparisons"] if c["figure"] == "rm_score" and (c["a"], c["b"]) == ("dpo", "sft"))
    d = [ev[k]["dpo"]["rm_score"] - ev[k]["sft"]["rm_score"] for k in (1, 2)]
    assert c["diff"] == pytest.approx(sum(d) / 2) and c["ci"][0] < c["diff"] < c["ci"][1]
    assert c["family_size"] == 3 and c["p_holm"] >= c["p"] and c["verdict"] in ("dpo better", "sft better",
                                                                                 "not resolved")
    assert "Figures over 2 seeds (1, 2)" in out and "p (Holm)" in out and "dpo - simpo" in out
    assert (root / "replicates.md").read_text().startswith("Figures over 2 seeds")

    run_experiment(load_config(exp))  # nothing changed: every stage, every seed, skipped
    again = capsys.readouterr().out
    assert "running" not in again and again.count("skipped") == 7 + 3 * 2

    # a launched stage gets its seed; run alone it must name one
    assert launch_command(for_seed(cfg, 2), "dpo", 1, [])[-2:] == ["--replicate-seed", "2"]
    assert "--replicate-seed" not in launch_command(for_seed(cfg, 2), "sft", 1, [])
    assert cli.main(["dpo", str(exp)]) == 2
    assert "dpo runs once per seed (seeds [1, 2]); is missing" in capsys.readouterr().err
    assert cli.main(["dpo", str(exp), "--replicate-seed", "5"]) == 2
    assert cli.main(["sft", str(exp), "--replicate-seed", "1"]) == 2


def test_one_policy_across_replicated_runs(tmp_path, capsys):
    """Two runs that differ in a setting, compared seed by seed: dpo gold (0.80, 0.90) in run a and (0.85, 0.97) in
    run b: b - a = (0.05, 0.07), mean 0.06, sd 0.01414, se 0.01, t = 6 on 1 df, p = 1 - 2 atan(6) / pi = 0.1051."""
    from prefopt.analysis.replicates import across_runs, main, seed_summaries

    for run, golds in (("a", (0.80, 0.90)), ("b", (0.85, 0.97))):
        for seed, g in zip((1, 2), golds):
            d = tmp_path / run / f"seed-{seed}" / "evaluate"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({"baseline": "sft", "policies": {
                "sft": {"gold_score": 0.7}, "dpo": {"gold_score": g}}}))
    runs = {"a": seed_summaries(tmp_path / "a"), "b": seed_summaries(tmp_path / "b")}
    assert sorted(runs["a"]) == [1, 2]
    agg = across_runs(runs, "dpo")
    c = next(c for c in agg["comparisons"] if c["figure"] == "gold_score" and (c["a"], c["b"]) == ("a", "b"))
    assert c["diff"] == pytest.approx(-0.06) and c["se"] == pytest.approx(0.01)
    assert c["p"] == pytest.approx(1 - 2 * math.atan(6) / math.pi, abs=1e-9)
    assert main([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--policy", "dpo"]) == 0
    assert "a - b" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no policy 'ppo'"):
        across_runs(runs, "ppo")
