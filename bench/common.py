"""What every whole-process bench shares: run one system in a fresh process with a fixed thread count and read the
`BENCH_RESULT {json}` line it prints, wall time added."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def run_child(script: str, args: list[str], threads: int, label: str) -> dict:
    """`python script --child ...args` with `threads` BLAS/OpenMP threads, offline, W&B off; its result and wall
    seconds. A failure raises with the child's last output, naming `label`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{label} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(line[len("BENCH_RESULT "):])
    out["wall_seconds"] = wall
    return out
