"""prefopt.analysis (loading records, figures) and `prefopt report` on synthetic finished runs."""

from __future__ import annotations

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
    assert "| 1 | simpo | 0.51 | - | - | 0.7 | 0.65 | 6 | 12 |" in text  # gold_gain, gold win: not in this run
    assert "| sft | 1 | 1.5 | train_loss=1.2, eval_loss=1.1 |" in text
    assert "20 pairs" in text and "gap +" in text
    for name in A.FIGURES:
        png = run / "report" / f"{name}.png"
        assert png.exists() and png.stat().st_size > 5000
        assert f"]({name}.png)" in text


def test_report_on_a_run_with_missing_stages(tmp_path):
    run = make_fake_run(tmp_path, "early", stages=("task", "sft"))
    text = open(write_report(run)).read()
    assert "No evaluate stage has finished" in text and "| sft |" in text
    assert all((run / "report" / f"{n}.png").exists() for n in A.FIGURES)


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
