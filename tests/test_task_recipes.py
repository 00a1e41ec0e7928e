"""The quickstart's recipe with only the task swapped (issue 8): never a silent degradation. Either the run stops at
the reward-model gate with its message and exit code, or on the task's test prompts no aligner lowers the gold
score beyond two standard errors, and an aligner the reward model calls better while gold shows no significant gain
is named in a warning under the table.

Measured (seed 42, likelihood reward model; docs/methods.md), gold gain over SFT ± SE: reverse DPO +0.074 ± 0.009,
SimPO +0.069 ± 0.009, PPO +0.045 ± 0.007; lookup +0.035 ± 0.016, +0.029 ± 0.015, +0.025 ± 0.013 (both warned). The
issue's +0.10 target is not reached on these two tasks, whose SFT policies are weak (gold 0.23 and 0.19); the
classifier reward model stopped both at the gate. The curves and best-of-n are left off here (evaluation only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["reverse", "lookup"])
def test_quickstart_recipe_on_another_task(tmp_path, task):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "prefopt", "run", "experiments/quickstart.yaml",
                          f"--output_dir={tmp_path}", f"--name=qs-{task}", f"--task.name={task}",
                          "--launch.launcher=inline", "--evaluate.checkpoints=false", "--evaluate.best_of_n=[]"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    root = tmp_path / f"qs-{task}"
    reward = json.loads((root / "reward" / "summary.json").read_text())
    if out.returncode == 5:  # the gate: the message, and no stage that uses the reward model ran
        assert "reward model gate" in out.stderr and reward["eval/accuracy"] < 0.65
        assert not (root / "pairs").exists() and not (root / "dpo").exists()
        return
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    summary = json.loads((root / "evaluate" / "summary.json").read_text())
    assert summary["split"] == "test"
    figs = summary["policies"]
    for name in ("dpo", "simpo", "ppo"):
        gain, se = figs[name]["gold_gain"], figs[name]["gold_gain_se"]
        where = f"{task}/{name}: gold {figs[name]['gold_score']:.3f} vs SFT {figs['sft']['gold_score']:.3f}"
        assert gain > -2 * se, where  # never worse beyond noise
        rm_says_better = figs[name]["win_rate_vs_sft"] > 0.5 + 2 * figs[name]["win_rate_vs_sft_se"]
        if gain <= 2 * se and rm_says_better:  # no significant gain while the reward model says "better": said
            assert f"WARNING: {name}: the reward model prefers it" in out.stdout, where
    assert reward["eval/accuracy"] >= 0.65 and reward["kind"] == "likelihood"
    assert "reward model: held-out pairwise accuracy" in out.stdout
