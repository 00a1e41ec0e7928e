"""A node's GPUs for the stages that run outside a launcher (`generate`, `score`): which GPUs this process may use,
worker processes over them, and giving back what a stage held before the next stage loads its model.

A data-parallel stage writes a job (a pickled dict naming its worker function, `"worker": "module:function"`) and
starts `python -m prefopt.dist.gpus JOB RANK WORLD` once per worker, each with its own GPUs in `CUDA_VISIBLE_DEVICES`.
The worker function takes (job, rank, world) and does every `world`-th piece of the job from `rank`; the stage then
finds the pieces done, as it finds a resumed run's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Exit codes a worker passes on (those of `prefopt`'s own errors), and how the stage's one line names them.
_EXIT_KINDS = {2: "config error", 3: "data error"}


class WorkerFailed(RuntimeError):
    """A data-parallel worker ended with an error: one line naming each failed worker, its exit code and last line.
    `exit_code` and `kind` are the CLI's (a worker's data error is still a data error)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
        self.kind = _EXIT_KINDS.get(exit_code, "error")


def visible_gpus() -> list[str]:
    """The GPU ids this process may use (CUDA_VISIBLE_DEVICES, else every device torch sees)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def data_parallel_size(setting: int, gpus_per_worker: int = 1) -> int:
    """Workers to run at once: `setting` (a stage's `data_parallel`), or with 0 one per `gpus_per_worker` visible
    GPUs (one on a machine without a GPU)."""
    if setting:
        return setting
    return max(1, len(visible_gpus()) // gpus_per_worker)


def free_gpu_memory() -> None:
    """Hand what this process's CUDA allocator holds back to the GPU, after the caller dropped its last reference to
    a model: the next stage (another process, or vLLM) cannot use memory the allocator keeps cached."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_workers(folder: Path, job: dict, workers: int, gpus_per_worker: int, what: str, key: str) -> None:
    """Run `job["worker"]` in `workers` processes, worker i on GPUs [i*g, (i+1)*g) of the visible ones (g =
    `gpus_per_worker`; none on a machine without a GPU) and with its share of this process's threads. The job file
    and each worker's output are dot-files in `folder` (not outputs of the stage); the outputs are removed when all
    succeed. A failed worker is a `WorkerFailed` naming it, in one line (`what`: "generation"); more workers than
    GPUs a ValueError naming `key`."""
    import pickle

    import torch

    gpus = visible_gpus() if torch.cuda.is_available() else []
    if gpus and workers * gpus_per_worker > len(gpus):
        each = f" x {gpus_per_worker} GPUs each" if gpus_per_worker > 1 else ""
        raise ValueError(f"{key}: {workers} workers{each} need {workers * gpus_per_worker} GPUs; {len(gpus)} are "
                         "visible")
    folder = Path(folder)
    job_file = folder / ".data_parallel_job.pkl"
    with open(job_file, "wb") as f:
        pickle.dump(job, f)
    omp = os.environ.get("OMP_NUM_THREADS")
    budget = int(omp) if omp and omp.isdigit() else (os.cpu_count() or 1)
    procs = []
    for rank in range(workers):
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, budget // workers))}
        mine = gpus[rank * gpus_per_worker:(rank + 1) * gpus_per_worker]
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        log = folder / f".data_parallel_{rank}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "prefopt.dist.gpus", str(job_file), str(rank), str(workers)],
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append((rank, proc, log, mine))
    failed, code = [], 0
    for rank, proc, log, mine in procs:
        proc.wait()
        if proc.returncode != 0:
            on = f" (GPU {','.join(mine)})" if mine else ""
            failed.append(f"worker {rank} exited {proc.returncode}{on}: {last_line(log)}; its output: {log}")
            code = code or (proc.returncode if proc.returncode in _EXIT_KINDS else 1)
    job_file.unlink(missing_ok=True)
    if failed:
        raise WorkerFailed(f"data-parallel {what} failed (the work it finished is kept; rerun to resume): "
                           + " | ".join(failed), code)
    for _, _, log, _ in procs:
        log.unlink(missing_ok=True)


def last_line(log: Path) -> str:
    """The last non-empty line a worker wrote (its error, from `main`), cut to 300 characters."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def main(job_file: str, rank: int, world: int) -> int:
    """One worker: the job's function on its share; an error's traceback, then one line saying what it was, and the
    exit code `prefopt` gives that error."""
    import importlib
    import pickle
    import traceback

    from prefopt.config import ConfigError
    from prefopt.data.errors import DataError

    with open(job_file, "rb") as f:
        job = pickle.load(f)
    module, name = job["worker"].split(":")
    try:
        getattr(importlib.import_module(module), name)(job, rank, world)
    except Exception as e:  # noqa: BLE001 - reported to the stage in one line, by exit code and the last line
        traceback.print_exc()
        message = " ".join(str(e).split())
        print(f"{type(e).__name__}: {message}", flush=True)
        return 2 if isinstance(e, ConfigError) else 3 if isinstance(e, DataError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
