"""The quickstart's recipe with only the task swapped (issue 8): each aligner raises the gold score by at least 0.10
over SFT on the task's test prompts, or the run stops at the reward-model gate with its message and exit code
before any stage that uses the reward model. Never a silent degradation.

Measured (seed 42, likelihood reward model, SFT 12 epochs on the shared loop, every pass in the prefix tree,
2 threads; docs/methods.md), gold gain over SFT ± SE: reverse DPO +0.245 ± 0.017, SimPO +0.212 ± 0.018, PPO +0.210
± 0.017 (SFT gold 0.580, RM test accuracy 0.815 ± 0.019; before the prefix tree +0.167, +0.125, +0.149). With 8
SFT epochs reverse's SFT policy was bimodal across seeds and float rounding (docs/methods.md): on one CI machine it
landed at 0.36 and the aligners gained +0.07-0.09, failing this test; 12 epochs learned to reverse on each of four
seeds. Lookup stops at the gate (RMs at 0.63-0.70, 0.653 ± 0.024 with the prefix tree: not above the quickstart's
floor, 0.70, beyond noise; with the gate off the aligners gained -0.01 to +0.05). The curves and best-of-n are left
off here (evaluation only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
# reverse gains as measured; lookup stopped at the gate, but a better reward model (or SFT policy) that passes it
# must then show the gains: either outcome is right, a silent pass through the gate without them is not
@pytest.mark.parametrize("task,allowed", [("reverse", {"gains"}), ("lookup", {"gains", "gate"})])
def test_quickstart_recipe_on_another_task(tmp_path, task, allowed):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "prefopt", "run", "experiments/quickstart.yaml",
                          f"--output_dir={tmp_path}", f"--name=qs-{task}", f"--task.name={task}",
                          "--launch.launcher=inline", "--evaluate.checkpoints=false", "--evaluate.best_of_n=[]"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    root = tmp_path / f"qs-{task}"
    reward = json.loads((root / "reward" / "summary.json").read_text())
    outcome = {0: "gains", 5: "gate"}.get(out.returncode)
    assert outcome in allowed, f"exit {out.returncode}: " + out.stdout[-2000:] + out.stderr[-4000:]
    floor = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())["reward"]["min_eval_accuracy"]
    if outcome == "gate":  # the gate: the message, and no stage that uses the reward model ran
        assert "reward model gate" in out.stderr and f"reward.min_eval_accuracy={floor:g}" in out.stderr
        assert reward["eval/accuracy"] - 1.96 * reward["eval/accuracy_se"] < floor
        assert not (root / "pairs").exists() and not (root / "dpo").exists()
        return
    summary = json.loads((root / "evaluate" / "summary.json").read_text())
    assert summary["split"] == "test"
    figs = summary["policies"]
    for name in ("dpo", "simpo", "ppo"):
        gain, se = figs[name]["gold_gain"], figs[name]["gold_gain_se"]
        where = f"{task}/{name}: gold {figs[name]['gold_score']:.3f} vs SFT {figs['sft']['gold_score']:.3f}"
        assert gain >= 0.10 and gain > 2 * se, where  # the bar, beyond noise
        assert figs[name]["win_rate_vs_sft_gold"] > 0.5, where
    assert reward["eval/accuracy"] - 1.96 * reward["eval/accuracy_se"] >= floor and reward["kind"] == "likelihood"
    assert "reward model: held-out pairwise accuracy" in out.stdout
