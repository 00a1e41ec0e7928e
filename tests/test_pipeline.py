"""`prefopt run` / `prefopt check`: skip what is finished, rerun what changed, the lock, every shipped YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_experiment, write_yaml
from prefopt.config import load_config
from prefopt.pipeline import LockedError, experiment_lock

REPO = Path(__file__).resolve().parents[1]


def prefopt(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "prefopt", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def markers(root: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/_DONE.json")}


def test_finished_stages_skip_and_changes_rerun_downstream_only(tmp_path):
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["task", "base", "sft"]))
    out = prefopt("run", exp)
    assert out.returncode == 0, out.stderr[-3000:]
    root = tmp_path / "runs" / "tiny"
    first = markers(root)
    assert set(first) == {"task", "base", "sft"}

    out = prefopt("run", exp)
    assert out.returncode == 0 and out.stdout.count("skipped") == 3
    assert markers(root) == first

    out = prefopt("run", exp, "--sft.learning_rate=3e-4")
    assert out.returncode == 0, out.stderr[-3000:]
    second = markers(root)
    assert second["task"] == first["task"] and second["base"] == first["base"]
    assert second["sft"] != first["sft"]
    assert "sft: running" in out.stdout and "base: running" not in out.stdout

    # a changed base (upstream) reruns base and sft but not the task
    out = prefopt("run", exp, "--sft.learning_rate=3e-4", "--base.hidden_size=48")
    third = markers(root)
    assert third["task"] == first["task"] and third["base"] != second["base"] and third["sft"] != second["sft"]


def test_lock_refuses_a_second_run(tmp_path):
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["task"]))
    root = tmp_path / "runs" / "tiny"
    with experiment_lock(root):
        out = prefopt("run", exp)
        assert out.returncode != 0 and "in use by another prefopt run" in out.stderr
        with pytest.raises(LockedError):
            with experiment_lock(root):
                pass
    assert prefopt("run", exp).returncode == 0  # released


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "experiments").rglob("*.yaml")
                                        if "accelerate" not in p.parts and "sweeps" not in p.parts))
def test_check_every_experiment_yaml(path, capsys):
    from prefopt.pipeline import check

    cfg = load_config(REPO / path)
    assert cfg.config_path.endswith(path)
    assert check(cfg) == 0, capsys.readouterr().out
    head = []  # the comment block at the top must give the command that runs it
    for line in (REPO / path).read_text().splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    assert head and any("prefopt run" in ln or "accelerate launch" in ln for ln in head)


def test_check_warns_on_global_batch_mismatch(capsys):
    from prefopt.pipeline import check

    cfg = load_config(REPO / "experiments/alpaca/llama7b.yaml", ["--sft.gradient_accumulation_steps=2"])
    assert check(cfg) == 0
    out = capsys.readouterr().out
    assert "WARNING: sft: global batch is 64" in out and "recipe states 128" in out


def test_check_reports_missing_input_stage(capsys):
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.pipeline import check

    cfg = from_dict(ExperimentConfig, {"name": "x", "stages": ["dpo"]})
    assert check(cfg) == 1
    assert "dpo: reads stage 'sft'" in capsys.readouterr().out
