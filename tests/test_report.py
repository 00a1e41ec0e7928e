"""prefopt.analysis (loading records, figures) and `prefopt report` on synthetic finished runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from fake_run import STEPS, make_fake_run
from prefopt import analysis as A
from prefopt.report import write_report


def test_load_run_tables(tmp_path):
    run = make_fake_run(tmp_path, "fake")
    data = A.load_run(run)
    m = data["metrics"]
    dpo = m[m.stage == "dpo"]
    assert len(dpo) == STEPS and list(dpo["step"]) == list(range(1, STEPS + 1))
    assert dpo["rewards/margins"].iloc[-1] == pytest.approx(0.1 * (STEPS - 1) * 1.1)
    assert set(m["stage"]) == {"task", "sft", "dpo", "simpo", "ppo"}
    ev = data["evaluate"].set_index("policy")
    assert list(ev.index) == ["sft", "dpo", "simpo", "ppo"]
    assert ev.loc["dpo", "kl_to_sft"] == pytest.approx(5.0) and ev.loc["simpo", "gold_score"] == pytest.approx(0.51)
    assert len(data["pairs"]) == 20 and data["pairs"]["chosen_len"].notna().all()
    stages = A.stage_table(data).set_index("stage")
    assert stages.loc["sft", "wall_seconds"] == 1.5  # timings.json wins over the summary's 12.5
    assert stages.loc["task", "wall_seconds"] == pytest.approx(0.1)  # no timing: the summary's own


def test_load_run_reads_later_rounds(tmp_path):
    run = make_fake_run(tmp_path, "iter")
    make_fake_run(run / "round2", "x", stages=("dpo", "evaluate"))
    (run / "round2" / "x" / "dpo").rename(run / "round2" / "dpo")
    (run / "round2" / "x" / "evaluate").rename(run / "round2" / "evaluate")
    data = A.load_run(run)
    assert sorted(data["evaluate"]["round"].unique()) == [1, 2]
    assert len(data["metrics"].query("stage == 'dpo' and round == 2")) == STEPS


def test_load_runs_stacks_and_tolerates_empty(tmp_path):
    a, b = make_fake_run(tmp_path, "a", dpo_beta=0.1), make_fake_run(tmp_path, "b", dpo_beta=0.5)
    data = A.load_runs([a, b])
    assert set(data["evaluate"]["run"]) == {"a", "b"} and len(data["evaluate"]) == 8
    empty = A.load_runs([])
    assert all(isinstance(v, pd.DataFrame) and v.empty for v in empty.values())
    for plot in A.FIGURES.values():  # every figure draws from nothing without failing
        assert len(plot(empty).axes) >= 2


def test_report_writes_markdown_and_figures(tmp_path):
    run = make_fake_run(tmp_path, "fake")
    md = write_report(run)
    assert md == str(run / "report" / "report.md")
    text = open(md).read()
    assert "| 1 | simpo | 0.51 | 0.7 | 0.65 | 6 | 12 |" in text  # gold_gain, gold win: in no row, no column
    assert "| sft | 1 | 1.5 | train_loss=1.2, eval_loss=1.1 |" in text
    assert "20 pairs" in text and "gap +" in text
    for name in A.FIGURES:
        png = run / "report" / f"{name}.png"
        if name == "replicates":  # one seed: no per-seed figure
            assert not png.exists() and "replicates.png" not in text
            continue
        assert png.exists() and png.stat().st_size > 5000
        assert f"]({name}.png)" in text


def test_replicated_run_rows_carry_their_seed(tmp_path):
    """A replicated run keeps its seeded stages in seed-<s>/: load_run gives each row its seed, timings.json's
    `dpo@1@seed-3` key joins its stage, and the report draws the per-seed points and shows the table over seeds."""
    run = make_fake_run(tmp_path, "rep", stages=("task", "sft"))
    for seed, shift in ((3, 0.0), (4, 0.1)):
        make_fake_run(run / "tmp", "x", stages=("dpo", "evaluate"))
        (run / "tmp" / "x").rename(run / f"seed-{seed}")
        summary = run / f"seed-{seed}" / "evaluate" / "summary.json"
        s = json.loads(summary.read_text())
        s["policies"]["dpo"]["gold_score"] += shift
        summary.write_text(json.dumps(s))
    timings = json.loads((run / "timings.json").read_text())
    (run / "timings.json").write_text(json.dumps({**timings, "dpo@1@seed-3": 7.0, "dpo@1@seed-4": 9.0}))
    (run / "replicates.md").write_text("Figures over 2 seeds (3, 4)\n")
    data = A.load_run(run)
    ev = data["evaluate"]
    dpo = ev[ev.policy == "dpo"].set_index("seed")
    assert sorted(dpo.index) == [3, 4]
    assert dpo.loc[4, "gold_score"] - dpo.loc[3, "gold_score"] == pytest.approx(0.1)
    assert "seed" in A.evaluate_table(data).columns
    stages = A.stage_table(data)
    walls = stages[stages.stage == "dpo"].set_index("seed")["wall_seconds"]
    assert walls.loc[3] == 7.0 and walls.loc[4] == 9.0
    assert stages[stages.stage == "sft"]["wall_seconds"].iloc[0] == 1.5  # a shared stage's timing still joins
    text = open(write_report(run)).read()
    assert "## Replicates" in text and "Figures over 2 seeds (3, 4)" in text
    assert (run / "report" / "replicates.png").stat().st_size > 5000 and "](replicates.png)" in text


def test_report_on_a_run_with_missing_stages(tmp_path):
    run = make_fake_run(tmp_path, "early", stages=("task", "sft"))
    text = open(write_report(run)).read()
    assert "No evaluate stage has finished" in text and "| sft |" in text
    assert all((run / "report" / f"{n}.png").exists() for n in A.FIGURES if n != "replicates")


def test_report_on_a_sweep_folder(tmp_path):
    runs = [make_fake_run(tmp_path, f"exp-sw-t{k}", dpo_beta=b) for k, b in enumerate([0.1, 0.5], 1)]
    sweep = tmp_path / "sweeps" / "sw"
    sweep.mkdir(parents=True)
    pd.DataFrame({"trial": [1, 2], "dpo.beta": [0.1, 0.5], "run_dir": [str(r) for r in runs]}).to_csv(
        sweep / "trials.csv", index=False)
    text = open(write_report(sweep)).read()
    assert "## Sweep trials" in text and "| 2 | 0.5 |" in text
    assert "exp-sw-t1" in text and "exp-sw-t2" in text  # per-run rows in the evaluate table


def test_cli_report(tmp_path):
    run = make_fake_run(tmp_path, "cli")
    out = subprocess.run([sys.executable, "-m", "prefopt", "report", str(run)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("report.md") and (run / "report" / "report.md").exists()
