"""A synthetic finished run directory in the exact record formats the stages write (prefopt.runtime.tracking, the
pairs and evaluate stages), so the report and notebook tests need no training."""

from __future__ import annotations

import json
import random
from pathlib import Path

STEPS = 6


def _write_stage(root: Path, stage: str, summary: dict, metrics: list[dict] | None = None) -> Path:
    d = root / stage
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(f"stage: {stage}\nround: 1\n")
    with open(d / "metrics.jsonl", "w") as f:
        for i, row in enumerate(metrics or []):
            f.write(json.dumps({"step": row.pop("step", i + 1), "time": 1.7e9 + i, **row}) + "\n")
    (d / "summary.json").write_text(json.dumps({"stage": stage, "round": 1, **summary}))
    (d / "_DONE.json").write_text(json.dumps({"fingerprint": "0" * 16, "finished": 1.7e9}))
    return d


def make_fake_run(root: Path, name: str = "fake", seed: int = 0, dpo_beta: float = 0.1,
                  stages: tuple[str, ...] = ("task", "sft", "pairs", "dpo", "simpo", "ppo", "evaluate")) -> Path:
    """runs/<name> with task, sft, pairs (pairs.jsonl), dpo, simpo, ppo and evaluate records."""
    rng = random.Random(seed)
    run = Path(root) / name
    run.mkdir(parents=True, exist_ok=True)
    if "task" in stages:
        _write_stage(run, "task", {"task": "sort", "num_sft": 64, "sft_accuracy": 0.6, "wall_seconds": 0.1},
                     [{"step": None, "num_sft": 64}])
    if "sft" in stages:
        _write_stage(run, "sft", {"model": "x", "train_loss": 1.2, "eval_loss": 1.1, "wall_seconds": 12.5},
                     [{"loss": 3.0 - 0.3 * i, "learning_rate": 1e-3} for i in range(STEPS)])
    if "pairs" in stages:
        d = _write_stage(run, "pairs", {"pairs": 20, "wall_seconds": 0.3})
        with open(d / "pairs.jsonl", "w") as f:
            for i in range(20):
                cl, rl = rng.randint(4, 12), rng.randint(3, 10)
                f.write(json.dumps({"prompt_id": i, "prompt": "p", "chosen": "c" * cl, "rejected": "r" * rl,
                                    "chosen_index": 0, "rejected_index": 1, "chosen_score": 1.0,
                                    "rejected_score": -1.0, "chosen_len": cl, "rejected_len": rl,
                                    "generator_sha256": "g", "reward_model_sha256": "r", "seed": 0}) + "\n")
    for method in ("dpo", "simpo"):
        if method in stages:
            rows = [{"loss": 0.69 - 0.05 * i * (1 + dpo_beta), "rewards/margins": 0.1 * i * (1 + dpo_beta),
                     "rewards/accuracies": 0.5 + 0.05 * i, "rewards/chosen": 0.05 * i,
                     "rewards/rejected": -0.05 * i} for i in range(STEPS)]
            _write_stage(run, method, {"model": "m", "steps": STEPS, "train_loss": 0.5, "rewards/margins": 0.5,
                                       "wall_seconds": 20.0}, rows)
    if "ppo" in stages:
        _write_stage(run, "ppo", {"reward": 0.4, "kl": 2.0, "iterations": STEPS, "wall_seconds": 30.0},
                     [{"reward": 0.1 * i, "kl": 0.3 * i, "length": 10 + i, "loss/policy": -0.01 * i}
                      for i in range(STEPS)])
    if "evaluate" in stages:
        policies = {"sft": {"gold_score": 0.3, "rm_score": 0.0, "win_rate_vs_sft": 0.5, "kl_to_sft": 0.0,
                            "length": 9.0}}
        for i, m in enumerate(["dpo", "simpo", "ppo"]):
            if m in stages:
                policies[m] = {"gold_score": 0.4 + 0.1 * i + dpo_beta * 0.1, "rm_score": 0.5 + 0.2 * i,
                               "win_rate_vs_sft": 0.6 + 0.05 * i, "kl_to_sft": 1.0 / (dpo_beta + 0.1) + i,
                               "length": 10.0 + 2 * i, "model": f"runs/{name}/{m}/model"}
        _write_stage(run, "evaluate", {"policies": policies, "baseline": "sft", "wall_seconds": 8.0})
    (run / "timings.json").write_text(json.dumps({f"{s}@1": 1.5 for s in stages if s != "task"}))
    return run
