"""`prefopt run` / `prefopt check`: skip what is finished, rerun what changed, the lock, every shipped YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_experiment, write_yaml
from prefopt.experiment import load_config
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


def test_check_keeps_the_recipe_global_batch(capsys):
    """An accumulation that would give another global batch than the recipe's is derived again (tests/test_scale.py
    has the multi-node cases and the refusals)."""
    from prefopt.pipeline import check

    cfg = load_config(REPO / "experiments/alpaca/llama7b.yaml", ["--sft.gradient_accumulation_steps=2"])
    assert check(cfg) == 0
    out = capsys.readouterr().out
    assert "sft: gradient_accumulation_steps 2 -> 4, so the global batch stays at the recipe's 128" in out
    assert cfg.sft.global_batch(8) == 128


def test_check_reports_missing_input_stage(capsys):
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.pipeline import check

    cfg = from_dict(ExperimentConfig, {"name": "x", "stages": ["dpo"]})
    assert check(cfg) == 2  # the config error exit code
    assert "dpo: reads stage 'sft'" in capsys.readouterr().out


FULL = ["task", "base", "sft", "reward", "generate", "score", "pairs", "dpo", "evaluate"]


@pytest.mark.slow
def test_iterative_rounds_generate_from_previous_policy(tmp_path):
    """iterations: 2 — round 2 samples from round 1's DPO policy and has its own stages and W&B runs."""
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=FULL, iterations=2))
    out = prefopt("run", exp)
    assert out.returncode == 0, out.stderr[-3000:]
    root = tmp_path / "runs" / "tiny"
    rows = [json.loads(x) for p in sorted((root / "round2" / "generate").glob("shard-*.jsonl"))
            for x in p.read_text().splitlines()]
    assert rows and all(Path(r["generator"]["path"]) == root / "dpo" / "model" for r in rows)
    first = [json.loads(x) for p in sorted((root / "generate").glob("shard-*.jsonl")) for x in p.read_text().splitlines()]
    assert all(Path(r["generator"]["path"]) == root / "sft" / "model" for r in first)
    assert (root / "round2" / "dpo" / "model" / "model.safetensors").exists()
    # round 2's DPO starts from round 1's policy: its recorded config says round 2
    assert "round: 2" in (root / "round2" / "dpo" / "config.yaml").read_text()
    summary = json.loads((root / "round2" / "evaluate" / "summary.json").read_text())
    assert set(summary["policies"]) == {"sft", "dpo"} and summary["wall_seconds"] > 0
    assert list((root / "round2" / "dpo" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_killed_experiment_resumes_to_same_figures(tmp_path):
    """Kill between stages and inside one (SFT, after a checkpoint); the resumed run ends with the same figures."""
    import signal
    import time

    cfg = tiny_experiment(tmp_path / "a", stages=FULL, sft={"max_steps": 6, "save_steps": 2})
    (tmp_path / "a").mkdir()
    straight = write_yaml(tmp_path / "a" / "e.yaml", cfg)
    assert prefopt("run", straight).returncode == 0
    want = json.loads((tmp_path / "a" / "runs" / "tiny" / "evaluate" / "summary.json").read_text())["policies"]

    (tmp_path / "b").mkdir()
    exp = write_yaml(tmp_path / "b" / "e.yaml", tiny_experiment(tmp_path / "b", stages=FULL,
                                                                sft={"max_steps": 6, "save_steps": 2}))
    root = tmp_path / "b" / "runs" / "tiny"
    # 1) killed between stages: only task and base, then stop
    assert prefopt("run", exp, "--only", "task").returncode == 0
    assert prefopt("run", exp, "--only", "base").returncode == 0
    # 2) killed inside SFT once its first checkpoint is on disk
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "prefopt", "run", str(exp)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = root / "sft" / "checkpoints" / "checkpoint-2" / "checkpoint_complete"  # the loop's last write
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "sft" / "_DONE.json").exists()
    out = prefopt("run", exp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "task: finished with the same fingerprint, skipped" in out.stdout
    got = json.loads((root / "evaluate" / "summary.json").read_text())["policies"]
    assert set(got) == set(want)
    for name in want:
        for key, value in want[name].items():
            if isinstance(value, float):
                assert got[name][key] == pytest.approx(value, abs=1e-6), (name, key)


@pytest.mark.parametrize("path", sorted((REPO / "experiments" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerate(path):
    """Every shipped launch config is one accelerate itself reads, with the setup its name promises."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    kind = str(cfg.distributed_type).split(".")[-1]
    name = path.stem
    if name.startswith("deepspeed"):
        assert kind == "DEEPSPEED" and cfg.deepspeed_config["zero_stage"] == int(name[len("deepspeed_zero")])
        if "offload" in name:
            assert cfg.deepspeed_config["offload_param_device"] == "cpu"
    elif name == "fsdp":
        assert kind == "FSDP" and cfg.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert "fsdp_transformer_layer_cls_to_wrap" not in cfg.fsdp_config  # each model's own (tests/test_scale.py)
    elif name == "fsdp2":
        assert kind == "FSDP" and int(cfg.fsdp_config["fsdp_version"]) == 2
        assert "fsdp_transformer_layer_cls_to_wrap" not in cfg.fsdp_config  # each model's own layer class
    elif name == "cpu_2proc":
        assert cfg.num_processes == 2 and cfg.use_cpu
    elif name == "single":
        assert cfg.num_processes == 1
    else:
        assert kind == "MULTI_GPU" and cfg.num_processes > 1
