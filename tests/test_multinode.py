"""Many nodes: `launch.srun` starts each training stage with one `accelerate launch` per Slurm node.

The two-node run is real: a stand-in `srun` (a shell script on PATH) starts the command once per "node" on this
machine with SLURM_NODEID 0 and 1, and the two accelerate launchers rendezvous over 127.0.0.1 as two machines of
one process each (DDP over gloo). What differs on a cluster is only that the nodes are other hosts."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefopt.experiment import load_config
from prefopt.pipeline import launch_command, slurm_head_node

REPO = Path(__file__).resolve().parents[1]

FAKE_SRUN = """#!/bin/bash
# stand-in for Slurm's srun: run the command once per node, here, with that node's SLURM_NODEID
echo "$@" >> "$SRUN_LOG"
nodes=1
while [[ "$1" == --* ]]; do case "$1" in --nodes=*) nodes="${1#--nodes=}";; esac; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def experiment(tmp_path, tiny_model_dir, **launch) -> Path:
    rows = [{"instruction": "Sort the numbers.", "input": f"{i % 7} {i % 3} {i % 5}",
             "output": " ".join(sorted([str(i % 7), str(i % 3), str(i % 5)]))} for i in range(32)]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(rows))
    cfg = {"name": "e", "output_dir": str(tmp_path / "runs"), "stages": ["sft"], "wandb": {"mode": "disabled"},
           "launch": launch,
           "sft": {"model": str(tiny_model_dir), "dataset": {"path": str(data)}, "num_train_epochs": 1,
                   "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 100,
                   "max_length": 256}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_srun_launch_command(tmp_path, tiny_model_dir):
    exp = experiment(tmp_path, tiny_model_dir, srun=True, num_machines=2, num_processes=16,
                     accelerate_config="experiments/accelerate/deepspeed_zero3.yaml", main_process_ip="10.1.2.3")
    cmd = launch_command(load_config(str(exp)), "sft", 1, ["--sft.learning_rate=2e-5"])
    assert cmd[:6] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
    assert len(cmd) == 7
    inner = cmd[6]
    assert inner == (f"{sys.executable} -m accelerate.commands.launch --config_file "
                     "experiments/accelerate/deepspeed_zero3.yaml --num_processes 16 --num_machines 2 "
                     '--machine_rank "$SLURM_NODEID" --main_process_ip 10.1.2.3 --main_process_port 29500 --quiet '
                     f"-m prefopt sft {exp} --round 1 --sft.learning_rate=2e-5")


def test_head_node_from_the_slurm_nodelist(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # stand-in for `scontrol show hostnames gpu[07-08]`
    scontrol.write_text('#!/bin/bash\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    assert slurm_head_node() == "gpu07"
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    with pytest.raises(ValueError, match="not inside a Slurm allocation"):
        slurm_head_node()


@pytest.mark.parametrize("launch,key,msg", [
    ({"num_machines": 2}, "launch.num_machines", "need srun: true"),
    ({"srun": True, "num_machines": 2, "num_processes": 3}, "launch.num_processes", "do not split evenly"),
    ({"srun": True, "launcher": "inline"}, "launch.srun", "needs launcher: accelerate"),
])
def test_bad_launch_settings(tmp_path, tiny_model_dir, launch, key, msg):
    with pytest.raises(ValueError, match=rf"{key}.*{msg}"):
        load_config(str(experiment(tmp_path, tiny_model_dir, **launch)))


def test_two_nodes_through_the_sbatch_script(tmp_path, tiny_model_dir):
    """experiments/slurm/prefopt_run.sbatch as Slurm would run it on the first of two nodes (one GPU each, here
    one CPU process each): `prefopt run` there, the sft stage through srun on both."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": '#!/bin/bash\necho 127.0.0.1\n'}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exp = experiment(tmp_path, tiny_model_dir)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SRUN_LOG": str(tmp_path / "srun.log"), "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[1-2]", "GPUS_PER_NODE": "1", "ACCELERATE_CONFIG": "",
           "MAIN_PROCESS_PORT": str(port), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "WANDB_MODE": "disabled"}
    out = subprocess.run(["bash", "experiments/slurm/prefopt_run.sbatch", str(exp)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    srun = (tmp_path / "srun.log").read_text()
    assert srun.startswith("--nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c ")
    assert f'--num_machines 2 --machine_rank "$SLURM_NODEID" --main_process_ip 127.0.0.1 --main_process_port {port}' in srun
    d = tmp_path / "runs" / "e" / "sft"
    ranks = sorted(json.loads(p.read_text())["rank"] for p in (d / "_ranks").glob("rank-*.json"))
    assert ranks == [0, 1]  # one process on each "node", one process group
    summary = json.loads((d / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8 and summary["steps"] == 32 // 8
    assert (d / "model" / "config.json").exists()


def test_ppo_is_launched_like_every_training_stage(tmp_path, tiny_model_dir):
    """PPO runs on a process group (tests/test_ppo_distributed.py): `prefopt run` launches it under launch.* like
    SFT, one accelerate launcher per node under srun, and `prefopt check` has no warning to give about it."""
    from prefopt.checks import problems_and_warnings

    exp = experiment(tmp_path, tiny_model_dir, srun=True, num_machines=2, num_processes=16, main_process_ip="h")
    cfg = load_config(str(exp))
    ppo, sft = launch_command(cfg, "ppo", 1, []), launch_command(cfg, "sft", 1, [])
    assert ppo[:6] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
    assert ppo[6] == sft[6].replace(" -m prefopt sft ", " -m prefopt ppo ")
    assert "--num_processes 16 " in ppo[6]
    cfg = load_config(str(REPO / "experiments" / "quickstart.yaml"), ["--launch.num_processes=2"])
    problems, warnings = problems_and_warnings(cfg)
    assert not [m for m in problems + warnings if m.startswith("ppo")], (problems, warnings)


def test_processes_of_a_node_share_its_threads():
    """`prefopt run` splits a node's OMP thread budget between its processes (two 2-thread processes on 2 cores
    made the quickstart's PPO stage 6x slower); one process keeps what it was given."""
    from prefopt.pipeline import threads_per_process

    assert threads_per_process("2", 2) == "1"
    assert threads_per_process("8", 4) == "2"
    assert threads_per_process("1", 2) == "1"  # never 0
    assert threads_per_process("8", 16, num_machines=2) == "1"  # 8 processes on each node
    assert threads_per_process("8", 1) is None
    assert threads_per_process(None, 2) == str(max(1, (os.cpu_count() or 1) // 2))
