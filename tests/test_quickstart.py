"""The quickstart as `make quickstart` runs it: every stage, training stages through `accelerate launch`, on CPU.

Targets (issue 8): on the *test* prompts (settings chosen on validation prompts only), each of DPO, SimPO and PPO
raises the mean gold score at temperature 1 over the SFT policy by 0.20 within the gain's 95% interval (and by at
least 0.15, beyond two standard errors); the
reward model's held-out accuracy is in the table; the over-optimisation curves are in `prefopt report`'s output,
checked on the figure's data; and the whole experiment finishes in under 15 minutes on the 2-core machine (7.5 in CI;
SFT 160 s, PPO 90 s and the evaluation of 19 saved checkpoints plus best-of-n take most of it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_improves_gold_score_with_every_method(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-m", "prefopt", "run", "experiments/quickstart.yaml",
                          f"--output_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    root = tmp_path / "quickstart"
    summary = json.loads((root / "evaluate" / "summary.json").read_text())
    figs = summary["policies"]
    assert summary["split"] == "test" and summary["num_prompts"] == 200
    assert {"sft", "dpo", "simpo", "ppo"} <= set(figs)
    for name in ("dpo", "simpo", "ppo"):
        gain = figs[name]["gold_score"] - figs["sft"]["gold_score"]
        assert gain == pytest.approx(figs[name]["gold_gain"])
        se = figs[name]["gold_gain_se"]
        # issue 8's target, +0.20, within the figure's own 95% interval, and beyond noise above SFT. Measured with
        # the README's recipe (SFT 12 epochs on the loop, every pass in the prefix tree): DPO +0.240, SimPO +0.243,
        # PPO +0.251, each ± 0.015-0.016.
        assert gain + 1.96 * se >= 0.20, f"{name}: gold {figs[name]['gold_score']:.3f} vs SFT " \
                                         f"{figs['sft']['gold_score']:.3f} (+{gain:.3f} ± {se:.3f})"
        assert gain >= 0.15 and gain > 2 * se and figs[name]["win_rate_vs_sft_gold"] > 0.5
        assert figs[name]["win_rate_vs_sft"] > 0.5 and figs[name]["kl_to_sft"] > 0
        assert figs[name]["rm_score"] > figs["sft"]["rm_score"]
    assert 0 < summary["wall_seconds"] < 900
    # the table the user sees: on the test split, with standard errors and the reward model's held-out accuracy
    assert "Figures on 200 test prompts x 4 samples" in out.stdout and "\nppo " in out.stdout
    assert "reward model: held-out pairwise accuracy" in out.stdout and " ± " in out.stdout
    rows = json.loads((root / "evaluate" / "dpo.json").read_text())
    assert rows and {"instruction", "output", "generator"} <= set(rows[0]) and rows[0]["generator"] == "dpo"
    # the reward model trained on simulated labels is good on held-out pairs (issue 3)
    reward = json.loads((root / "reward" / "summary.json").read_text())
    assert reward["eval/gold_accuracy"] >= 0.8
    assert reward["select/best_step"] in [h["step"] for h in reward["select/history"]]
    # the pairs stage audits the reward model against gold on the policy's own samples, and its own estimate of
    # its label quality (from the reward model's held-out margins) is close to that audit
    pairs = json.loads((root / "pairs" / "summary.json").read_text())
    assert pairs["gold/rm_pairwise_accuracy"] >= 0.85 and pairs["gold/chosen_better"] >= 0.9
    assert abs(pairs["label_quality/estimated_accuracy"] - pairs["gold/chosen_better"]) < 0.1
    # the over-optimisation curves: every aligner's checkpoints from the SFT policy (KL 0) to its final model, and
    # best-of-n; `prefopt report` draws them from the data it loads, which is what is checked here
    from prefopt import analysis as A

    curves = A.load_run(root)["curves"]
    for name in ("dpo", "simpo", "ppo"):
        c = curves[curves["method"] == name]
        assert len(c) >= 4 and c.iloc[0]["step"] == 0 and c.iloc[0]["kl"] == 0 and c.iloc[-1]["step"] == "final"
        assert c["gold"].notna().all() and c["rm"].notna().all() and (c["kl"].iloc[1:] > 0).all()
    bon = curves[curves["method"] == "best_of_n"]
    assert list(bon["step"]) == [1, 2, 4, 8, 16] and bon["kl"].iloc[0] == 0
    # best-of-n's KL is the exact KL under its samples (ties counted), at most the bound log n - (n-1)/n beside it
    assert list(bon["kl"]) == pytest.approx([b["kl"] for b in summary["best_of_n"]])
    assert all(b["kl"] <= b["kl_bound"] + 1e-12 for b in summary["best_of_n"])
    assert summary["best_of_n"][-1]["kl_bound"] == pytest.approx(math.log(16) - 15 / 16)
    report = subprocess.run([sys.executable, "-m", "prefopt", "report", str(root)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    md = (root / "report" / "report.md").read_text()
    assert "![overoptimisation](overoptimisation.png)" in md and "## Reward model" in md
    assert (root / "report" / "overoptimisation.png").stat().st_size > 10_000
    # training stages ran as accelerate subprocesses, each with its own offline W&B run
    assert "accelerate.commands.launch" in out.stdout
    # each one forked from the server that imported torch, transformers and accelerate once (runtime/forkserver.py)
    assert out.stdout.count("forked with its imports done") == 5, out.stdout[-3000:]
    for stage in ("sft", "reward", "dpo", "simpo", "ppo"):
        assert list((root / stage / "wandb").glob("offline-run-*")), stage
