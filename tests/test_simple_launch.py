"""`prefopt run` starts a one-process stage as accelerate's simple launcher would (pipeline.simple_launch): the
same command and the same environment, made by accelerate's own code, without the launcher's own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefopt.pipeline import LAUNCHER, simple_launch

REPO = Path(__file__).resolve().parents[1]
# what accelerate's launchers set for the child (the rest of the environment is inherited as it is)
KEYS = ("ACCELERATE_", "OMP_NUM_THREADS", "KMP_", "MASTER_", "CUDA_VISIBLE_DEVICES")


def test_the_stage_gets_the_command_and_environment_accelerate_launch_gives_it(tmp_path):
    script = tmp_path / "dump.py"
    script.write_text("import json, os, sys\n"
                      "json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, open(sys.argv[1], 'w'))\n")
    flags = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "--quiet"]
    out = tmp_path / "launched.json"
    subprocess.run(LAUNCHER + flags + [str(script), str(out), "--x=1"], check=True, timeout=120)
    launched = json.loads(out.read_text())

    cmd, env = simple_launch(LAUNCHER + flags + [str(script), str(out), "--x=1"])
    assert cmd == [sys.executable, str(script), str(out), "--x=1"]
    assert launched["argv"] == cmd[2:]
    picked = {k: v for k, v in launched["env"].items() if k.startswith(KEYS)}
    assert picked and {k: v for k, v in env.items() if k.startswith(KEYS)} == picked
    assert any(k.startswith("ACCELERATE_") for k in picked)  # accelerate set something for the child

    # a module (`-m prefopt STAGE ...`, as the pipeline launches) keeps its -m
    cmd, _ = simple_launch(LAUNCHER + flags + ["-m", "prefopt", "sft", "x.yaml"])
    assert cmd == [sys.executable, "-m", "prefopt", "sft", "x.yaml"]


def test_distributed_launches_are_left_to_accelerate():
    fsdp = REPO / "experiments" / "accelerate" / "fsdp.yaml"
    assert simple_launch(LAUNCHER + ["--config_file", str(fsdp), "-m", "prefopt", "sft", "x.yaml"]) is None
    assert simple_launch(LAUNCHER + ["--num_processes", "2", "--multi_gpu", "--num_machines", "1", "--mixed_precision",
                                     "no", "--dynamo_backend", "no", "-m", "prefopt", "sft", "x.yaml"]) is None
    assert simple_launch(["srun", "--nodes=2", "bash", "-c", "..."]) is None


def test_flags_accelerate_refuses_are_left_to_accelerate_to_report():
    """A command accelerate's own parser or checks refuse is run as it is, so `accelerate launch` prints its error."""
    assert simple_launch(LAUNCHER + ["--no-such-flag", "-m", "prefopt", "sft", "x.yaml"]) is None
    assert simple_launch(LAUNCHER + ["--multi_gpu", "--num_processes", "1", "-m", "prefopt", "sft", "x.yaml"]) is None
