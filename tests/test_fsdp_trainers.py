"""The TRL-Trainer stages (sft; reward, classifier) under FSDP2 on two CPU processes (accelerate's own FSDP2,
through tests/fsdp_on_cpu): the weights are sharded, so the saved model is gathered by every process together
(saving from rank 0 alone waited forever for the other's shards), it equals the one-process run with the same
global batch, a rerun resumes from the sharded checkpoint, and LoRA, which is merged from whole weights, is
refused before training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from pair_helpers import REPO, state_dict
from test_ppo_distributed import launch_env, launcher
from test_sft import sft_rows

def experiment(tmp_path, name: str, stage: str, section: dict, **top) -> str:
    cfg = {"name": name, "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"}, "seed": 3,
           "stages": [stage], stage: section, **top}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run(exp: str, stage: str, processes: int) -> subprocess.CompletedProcess:
    cmd = (launcher(2, fsdp=True) + ["-m"] if processes == 2 else [sys.executable, "-m"]) + ["prefopt", stage, exp]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(fsdp=processes == 2), capture_output=True, text=True,
                          timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def assert_close_weights(a_dir, b_dir, atol: float):
    a, b = state_dict(a_dir), state_dict(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def sft_section(tiny_model_dir, data, per_device: int, **extra) -> dict:
    return {"model": str(tiny_model_dir), "dataset": {"path": str(data)}, "max_steps": 6,
            "per_device_train_batch_size": per_device, "learning_rate": 1e-3, "logging_steps": 2, "save_steps": 3,
            "max_length": 256, **extra}


@pytest.mark.slow
def test_sft_fsdp2_matches_one_process_and_resumes(tmp_path, tiny_model_dir):
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(sft_rows()))
    ok(run(experiment(tmp_path, "fsdp", "sft", sft_section(tiny_model_dir, data, 4)), "sft", 2))
    ok(run(experiment(tmp_path, "one", "sft", sft_section(tiny_model_dir, data, 8)), "sft", 1))
    out = tmp_path / "runs" / "fsdp" / "sft"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    shards = sorted(p.name for p in (out / "checkpoints" / "checkpoint-3").rglob("*.distcp"))
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards  # each process wrote its own shard
    moved = max((w - state_dict(tiny_model_dir)[k]).abs().max().item() for k, w in state_dict(out / "model").items())
    assert moved > 1e-3  # 10x the tolerance below: the comparison is not of two untrained models
    assert_close_weights(out / "model", tmp_path / "runs" / "one" / "sft" / "model", atol=1e-5)  # measured 4e-7

    # stopped after checkpoint-3 (the final checkpoint and model gone): the rerun loads the sharded checkpoint
    first = tmp_path / "first"
    shutil.copytree(out / "model", first)
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    shutil.rmtree(out / "model")
    (out / "_DONE.json").unlink()
    ok(run(str(tmp_path / "fsdp.yaml"), "sft", 2))
    again = json.loads((out / "summary.json").read_text())
    assert again["resumed_from"].endswith("checkpoint-3") and again["steps"] == 6
    assert_close_weights(out / "model", first, atol=1e-6)


@pytest.mark.slow
def test_reward_fsdp2_matches_one_process(tmp_path, tiny_model_dir):
    """The classifier reward model: validation selection runs on every process (each forward is collective), the
    saved model is gathered, and the test figures, computed from the saved model, are the one-process run's."""
    task = {"num_sft": 10, "num_prompts": 4, "num_test_prompts": 4, "num_val_prompts": 4, "num_preferences": 48}
    common = {"model": str(tiny_model_dir), "kind": "classifier", "max_steps": 4, "save_steps": 2,
              "eval_fraction": 0.25, "test_fraction": 0.25, "logging_steps": 1, "learning_rate": 1e-3}
    for name, per_device, processes in (("fsdp", 4, 2), ("one", 8, 1)):
        exp = experiment(tmp_path, name, "reward", {**common, "per_device_train_batch_size": per_device},
                         task=task)
        ok(subprocess.run([sys.executable, "-m", "prefopt", "task", exp], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=300))
        ok(run(exp, "reward", processes))
    fsdp, one = (json.loads((tmp_path / "runs" / n / "reward" / "summary.json").read_text()) for n in ("fsdp", "one"))
    assert fsdp["train/steps"] == one["train/steps"] == 4
    assert [h["step"] for h in fsdp["select/history"]] == [2, 4]
    for h_fsdp, h_one in zip(fsdp["select/history"], one["select/history"]):
        assert h_fsdp["accuracy"] == h_one["accuracy"]
    assert fsdp["select/best_step"] == one["select/best_step"]
    assert fsdp["eval/accuracy"] == one["eval/accuracy"]
    assert fsdp["eval/margin"] == pytest.approx(one["eval/margin"], abs=1e-4)
    out = tmp_path / "runs" / "fsdp" / "reward" / "model"
    start = state_dict(tiny_model_dir)
    moved = max((w - start[k]).abs().max().item() for k, w in state_dict(out).items() if k in start)
    assert moved > 2e-3  # 10x the tolerance below
    # measured 2.3e-5: Adam's first steps amplify reduction-order noise (the SimPO FSDP2 test allows 2e-4 too)
    assert_close_weights(out, tmp_path / "runs" / "one" / "reward" / "model", atol=2e-4)


@pytest.mark.slow
def test_lora_under_fsdp2_is_refused_before_training(tmp_path, tiny_model_dir):
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(sft_rows()))
    exp = experiment(tmp_path, "lora", "sft", sft_section(tiny_model_dir, data, 4,
                                                          lora={"enabled": True, "r": 4, "alpha": 8}))
    proc = run(exp, "sft", 2)
    assert proc.returncode != 0
    assert "sft.lora.enabled: true under FSDP" in proc.stderr
    assert not list((tmp_path / "runs" / "lora" / "sft").glob("checkpoints/checkpoint-*"))  # no step was trained


@pytest.mark.parametrize("config, refused", [("fsdp2.yaml", "FSDP"), ("fsdp.yaml", "FSDP"),
                                             ("deepspeed_zero3.yaml", "DeepSpeed ZeRO-3"),
                                             ("deepspeed_zero2.yaml", None), ("ddp.yaml", None)])
def test_check_refuses_lora_where_the_weights_are_sharded(config, refused):
    """`prefopt check` finds what the stages refuse at start-up, for every stage with a LoRA switch."""
    from prefopt.checks import problems_and_warnings
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig

    for stage in ("sft", "reward", "dpo", "simpo"):
        cfg = from_dict(ExperimentConfig, {
            "name": "x", "stages": [stage],
            "launch": {"accelerate_config": str(REPO / "experiments" / "accelerate" / config)},
            stage: {"lora": {"enabled": True}}})
        problems, _ = problems_and_warnings(cfg)
        got = [p for p in problems if ".lora.enabled" in p]
        if refused is None:
            assert not got, problems
        else:
            assert len(got) == 1 and got[0].startswith(f"{stage}.lora.enabled: true under {refused} "
                                                       f"(launch.accelerate_config '{REPO}"), got
