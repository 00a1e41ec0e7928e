"""`prefopt run` and `prefopt check`: stage order, fingerprints, skip/resume, the lock, launching training stages.

A stage with a completion marker whose fingerprint matches is skipped; a changed config section (or a changed
input) reruns that stage and everything downstream, because downstream fingerprints include it. Training stages
start as their own `accelerate launch` processes (the experiment's accelerate config), generation and scoring in
this process. A lock file makes a second `prefopt run` on the same run directory an error.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from prefopt.experiment import ORDER, ROUND_STAGES, STAGES, ExperimentConfig, stage_dir
from prefopt.stage import FINGERPRINT, MARKER, fingerprint, is_done, run_stage, write_json


class LockedError(RuntimeError):
    pass


@contextmanager
def experiment_lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise LockedError(f"{root} is in use by another prefopt run ({holder or 'unknown process'}); "
                          "wait for it or use another experiment name") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def plan(cfg: ExperimentConfig) -> list[tuple[str, int]]:
    """(stage, round) in execution order: the one-off stages, then the round stages once per round."""
    steps = [(s, 1) for s in cfg.stages if s not in ROUND_STAGES]
    for r in range(1, cfg.iterations + 1):
        steps += [(s, r) for s in cfg.stages if s in ROUND_STAGES]
    return steps


def launch_command(cfg: ExperimentConfig, stage: str, round_: int, overrides: list[str]) -> list[str]:
    """`accelerate launch [--config_file F] [--num_processes N] -m prefopt STAGE CONFIG --round R overrides`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.launch.accelerate_config:
        cmd += ["--config_file", cfg.launch.accelerate_config]
    if cfg.launch.num_processes > 1:
        cmd += ["--num_processes", str(cfg.launch.num_processes)]
        if not cfg.launch.accelerate_config:
            cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    elif not cfg.launch.accelerate_config:
        cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "prefopt", stage, cfg.config_path, "--round", str(round_), *overrides]
    return cmd


def run_one(cfg: ExperimentConfig, stage: str, round_: int, overrides: list[str]) -> None:
    training = STAGES[stage][1]
    if training and cfg.launch.launcher == "accelerate":
        cmd = launch_command(cfg, stage, round_, overrides)
        print(f"[prefopt] $ {shlex.join(cmd)}", flush=True)
        env = dict(os.environ)
        if cfg.launch.num_processes > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = "1"  # one thread per process on CPU, or they fight over the cores
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"[prefopt] stage {stage} (round {round_}) failed with exit code {proc.returncode}; "
                             f"rerun the same command to resume")
    else:
        run_stage(cfg, stage, round_)


def run_experiment(cfg: ExperimentConfig, from_stage: str | None = None, only: str | None = None,
                   overrides: list[str] | None = None) -> dict:
    overrides = list(overrides or [])
    if cfg.launch.launcher == "accelerate" and not cfg.config_path:
        raise ValueError("launching stages through accelerate needs the experiment loaded from a YAML file")
    steps = plan(cfg)
    t0 = time.time()
    with experiment_lock(cfg.root):
        if from_stage:
            first = ORDER.index(from_stage)
            for s, r in steps:  # from `from_stage` on, start clean: no marker, no partial outputs to resume
                if ORDER.index(s) >= first:
                    (stage_dir(cfg, s, r) / MARKER).unlink(missing_ok=True)
                    (stage_dir(cfg, s, r) / FINGERPRINT).unlink(missing_ok=True)  # prepare_dir then clears it
        for s, r in steps:
            if only and s != only:
                continue
            label = s if cfg.iterations == 1 else f"{s} (round {r})"
            if is_done(cfg, s, r):
                print(f"[prefopt] {label}: finished with the same fingerprint, skipped", flush=True)
                continue
            print(f"[prefopt] {label}: running -> {stage_dir(cfg, s, r)}", flush=True)
            t_stage = time.time()
            run_one(cfg, s, r, overrides)
            record_timing(cfg, s, r, time.time() - t_stage)
    wall = experiment_wall_seconds(cfg)
    result = {"experiment": cfg.name, "root": str(cfg.root), "wall_seconds": wall,
              "this_invocation_seconds": round(time.time() - t0, 1)}
    final_eval = stage_dir(cfg, "evaluate", cfg.iterations) / "summary.json"
    if "evaluate" in cfg.stages and final_eval.exists():
        summary = json.loads(final_eval.read_text())
        summary["stage_wall_seconds"] = summary.get("stage_wall_seconds", summary.get("wall_seconds"))
        summary["wall_seconds"] = wall
        write_json(final_eval, summary)
        print_table(summary)
        result["evaluate"] = str(final_eval)
        print(f"[prefopt] figures: {final_eval} (table: {final_eval.parent / 'table.md'}); "
              f"`prefopt report {cfg.root}` draws them", flush=True)
    print(f"[prefopt] experiment {cfg.name}: {wall:.0f} s of stage time in all; outputs under {cfg.root}/", flush=True)
    return result


def record_timing(cfg: ExperimentConfig, stage: str, round_: int, seconds: float) -> None:
    """Wall time of each finished stage as `prefopt run` saw it (process start-up included)."""
    path = cfg.root / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[f"{stage}@{round_}"] = round(seconds, 2)
    write_json(path, timings)


def experiment_wall_seconds(cfg: ExperimentConfig) -> float:
    """The experiment's wall time: each stage's time as `prefopt run` measured it (or, for a stage run on its
    own, its recorded time), so a resumed experiment still reports the time its stages took."""
    path = cfg.root / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    total = 0.0
    for s, r in plan(cfg):
        if f"{s}@{r}" in timings:
            total += timings[f"{s}@{r}"]
            continue
        p = stage_dir(cfg, s, r) / "summary.json"
        if p.exists():
            d = json.loads(p.read_text())
            total += float(d.get("stage_wall_seconds", d.get("wall_seconds", 0.0)))
    return round(total, 1)


def print_table(summary: dict) -> None:
    policies = summary.get("policies", {})
    if not policies:
        return
    cols = ["gold_score", "rm_score", "win_rate_vs_sft", "kl_to_sft", "length"]
    head = f"{'policy':<10}" + "".join(f"{c:>17}" for c in cols)
    print(head)
    print("-" * len(head))
    for name, figs in policies.items():
        cells = []
        for c in cols:
            v = figs.get(c)
            cells.append(f"{v:>17.3f}" if isinstance(v, (int, float)) else f"{'-':>17}")
        print(f"{name:<10}" + "".join(cells))


def check(cfg: ExperimentConfig) -> int:
    """Validate and print the plan; returns 0, or 1 when a problem would stop the run."""
    from prefopt.checks import problems_and_warnings

    problems, warnings = problems_and_warnings(cfg)
    print(f"experiment {cfg.name}  ->  {cfg.root}")
    for s, r in plan(cfg):
        state = "skip (done)" if is_done(cfg, s, r) else "run"
        launch = "accelerate" if STAGES[s][1] and cfg.launch.launcher == "accelerate" else "in-process"
        label = s if cfg.iterations == 1 else f"{s}@round{r}"
        print(f"  {label:<18} {fingerprint(cfg, s, r)}  {launch:<11} {state}")
    for w in warnings:
        print(f"WARNING: {w}")
    for p in problems:
        print(f"ERROR: {p}")
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0
