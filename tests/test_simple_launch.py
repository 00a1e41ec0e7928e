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


DUMP_MODULE = """import json, os, signal, sys
print("out:", sys.argv[1:], flush=True)
print("err: to the pipe", file=sys.stderr, flush=True)
json.dump({"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(), "path0": sys.path[0],
           "own_session": os.getsid(0) == os.getpid(), "stdin": sys.stdin.read(),
           "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
           "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL},
          open(sys.argv[1], "w"), sort_keys=True)
if "--crash" in sys.argv:
    raise RuntimeError("boom")
if "--hang" in sys.argv:
    import time
    time.sleep(60)
if "--slow" in sys.argv:
    import time
    time.sleep(1.5)
    open(sys.argv[1] + ".finished", "w").close()
sys.exit(7)
"""

DRIVER = """import json, os, signal, subprocess, sys, time
from prefopt.runtime import forkserver
forkserver.PRELOAD = ["json"]  # the server's imports do not change what a stage gets; a light one is quicker
base = {**os.environ, "KMP_BLOCKTIME": "1"}
forkserver.start(base)
stage_env = {**base, "ACCELERATE_USE_CPU": "True", "PREFOPT_EXIT_FILE": "/x"}
out = {"fits": forkserver.fits(stage_env), "fits_omp": forkserver.fits({**stage_env, "OMP_NUM_THREADS": "3"}),
       "fits_missing": forkserver.fits({k: v for k, v in stage_env.items() if k != "KMP_BLOCKTIME"})}
cwd = sys.argv[1]
cmd = [sys.executable, "-m", "dumpmod"]
s = forkserver.Stage(cmd + [cwd + "/forked.json", "--x=1"], stage_env, cwd)
out["forked_stderr"] = s.stderr.read().decode()
out["forked_rc"] = s.wait()
p = subprocess.run(cmd + [cwd + "/popen.json", "--x=1"], env=stage_env, cwd=cwd, start_new_session=True,
                   stdin=subprocess.DEVNULL, capture_output=True, text=True)
out["popen_rc"], out["popen_stdout"] = p.returncode, p.stdout
s = forkserver.Stage(cmd + [cwd + "/crash.json", "--crash"], stage_env, cwd)
out["crash_stderr"] = s.stderr.read().decode()
out["crash_rc"] = s.wait()
s = forkserver.Stage(cmd + [cwd + "/hang.json", "--hang"], stage_env, cwd)
while not os.path.exists(cwd + "/hang.json"):
    time.sleep(0.05)
os.killpg(s.pid, signal.SIGTERM)  # the pipeline signals the stage's group (faults.forward_signals)
out["hang_rc"] = s.wait()
from multiprocessing import forkserver as mp_forkserver
server = mp_forkserver._forkserver._forkserver_pid
os.kill(server, signal.SIGTERM)  # Slurm's preemption signals every process of the job: the server ignores it
time.sleep(0.3)
out["server_after_sigterm"] = os.waitpid(server, os.WNOHANG) == (0, 0)
s = forkserver.Stage(cmd + [cwd + "/slow.json", "--slow"], stage_env, cwd)
while not os.path.exists(cwd + "/slow.json"):
    time.sleep(0.05)
os.kill(server, signal.SIGKILL)  # the server dies while the stage is still working
out["slow_rc"] = s.wait()
out["slow_finished_before_wait_returned"] = os.path.exists(cwd + "/slow.json.finished")
print("RESULT" + json.dumps(out))
"""


def test_a_forked_stage_gets_what_a_fresh_process_gets(tmp_path):
    """runtime/forkserver.py: a stage forked from the preloaded server gets the command line, environment, working
    directory, sys.path[0], own session, stdin, signal handlers, stdout, stderr and exit code that `Popen` of
    `python -m MODULE ...` gives it; a crash is a traceback and exit code 1, SIGTERM kills it as it kills a process;
    the server is used only while the stage's environment matches the one it imported in (but for the variables
    read when used: accelerate's, prefopt's). The driver script has no main guard: multiprocessing does not run it
    again in the stage."""
    (tmp_path / "dumpmod.py").write_text(DUMP_MODULE)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    p = subprocess.run([sys.executable, str(driver), str(tmp_path)], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.split("RESULT", 1)[1])
    assert (out["fits"], out["fits_omp"], out["fits_missing"]) == (True, False, False)
    assert out["forked_rc"] == out["popen_rc"] == 7
    assert out["forked_stderr"] == "err: to the pipe\n"
    assert f"out: ['{tmp_path}/forked.json', '--x=1']" in p.stdout  # the pipeline's stdout, as Popen's child has
    assert out["popen_stdout"] == f"out: ['{tmp_path}/popen.json', '--x=1']\n"
    forked, fresh = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("forked", "popen"))
    assert forked["argv"][1:] == fresh["argv"][1:] == ["--x=1"]
    # Python itself adds nothing to os.environ; the two environments are the stage's, key for key
    assert forked["env"] == fresh["env"]
    for key in ("cwd", "path0", "own_session", "stdin", "sigint", "sigterm"):
        assert forked[key] == fresh[key], key
    assert forked["path0"] == forked["cwd"] == str(tmp_path) and forked["own_session"] and forked["sigterm"]
    assert out["crash_rc"] == 1 and "RuntimeError: boom" in out["crash_stderr"]
    assert out["hang_rc"] == -15
    # the server outlives a SIGTERM to every process (Slurm), and were it killed, `wait` still returns only once the
    # stage has ended (multiprocessing reports 255 at once: the pipeline then reads the stage's exit file)
    assert out["server_after_sigterm"]
    assert out["slow_finished_before_wait_returned"] and out["slow_rc"] == 255


def test_the_server_starts_only_where_a_stage_would_fork_from_it(tmp_path, monkeypatch):
    """`pipeline.start_forkserver`: a server for `launch.preload` on a CPU machine, launching one-process stages
    through accelerate, started with the environment accelerate's simple launcher gives a stage; none with
    `preload: false`, the inline launcher, several processes, a GPU, or no training stage to run."""
    import torch
    import yaml

    from prefopt import pipeline
    from prefopt.experiment import load_config
    from prefopt.runtime import forkserver

    started = []
    monkeypatch.setattr(forkserver, "start", lambda env, log=os.devnull: started.append((env, log)))
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"name": "e", "output_dir": str(tmp_path / "runs"), "stages": ["task", "sft"]}))

    def starts(stages=("task", "sft"), **overrides) -> bool:
        started.clear()
        pipeline.start_forkserver(load_config(path, {f"launch.{k}": v for k, v in overrides.items()}), list(stages))
        return bool(started)

    assert starts()
    env, log = started[0]
    assert "ACCELERATE_USE_CPU" in env and log == str(tmp_path / "runs" / "e" / "logs" / "forkserver.log")
    assert not starts(preload=False)
    assert not starts(launcher="inline")
    assert not starts(num_processes=2)
    assert not starts(stages=("task", "base", "generate"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not starts()
