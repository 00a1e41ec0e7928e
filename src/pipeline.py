"""`prefopt run` and `prefopt check`: stage order, fingerprints, skip/resume, the lock, launching training stages.

A stage with a completion marker whose fingerprint matches is skipped; a changed config section (or a changed
input) reruns that stage and everything downstream, because downstream fingerprints include it. Training stages
start as their own `accelerate launch` processes (the experiment's accelerate config), generation and scoring in
this process. A lock file makes a second `prefopt run` on the same run directory an error.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

from prefopt.runtime import forkserver
from prefopt.runtime.console import StageOutput, stage_log_path
from prefopt.runtime.console import verbose as console_verbose
from prefopt.runtime.exits import StageFailed
from prefopt.runtime.tracking import HEADLINE_FIGURES, wandb_mode
from prefopt.experiment import (ORDER, ROUND_STAGES, STAGES, ExperimentConfig, for_seed, replicated_stage,
                                 stage_dir)
from prefopt.stage import (FINGERPRINT, MARKER, fingerprint, next_dir, recover_swap, run_stage, stage_status,
                           write_json)


class LockedError(RuntimeError):
    """Another prefopt command writes into this experiment directory (exit code 4)."""

    exit_code = 4
    kind = "lock error"


# A stage process launched by `prefopt run` finds here the token of the lock its parent holds, and does not wait
# for (deadlock on) that lock; any other process, a second `prefopt sft` included, is refused.
LOCK_ENV = "PREFOPT_LOCK_HELD"
# Where a launched stage process writes its exit code and one-line message, since `accelerate launch` exits 1.
EXIT_FILE_ENV = "PREFOPT_EXIT_FILE"
_held: dict[str, str] = {}  # lock file -> token, for the locks this process holds


@contextmanager
def experiment_lock(root: Path):
    """Hold `<root>/.lock` (flock) for the duration; the stage processes this one launches share it (LOCK_ENV)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # output_dir names a file, or a folder this user cannot write
        from prefopt.config import ConfigError

        raise ConfigError(f"output_dir: cannot make the experiment folder {root}: {e.strerror}") from None
    path = root / ".lock"
    key = str(path.resolve())
    inherited = os.environ.get(LOCK_ENV)
    if inherited and key not in _held and _lock_token(path) == inherited:
        yield  # the `prefopt run` that launched this process holds it
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = " ".join(f.read().split()[:2])  # "pid N", without the token
        f.close()
        raise LockedError(f"{root} is in use by another prefopt run ({holder or 'unknown process'}); "
                          "wait for it or use another experiment name") from None
    token = secrets.token_hex(8)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} token {token}\n")
    f.flush()
    _held[key] = token
    try:
        yield
    finally:
        _held.pop(key, None)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _lock_token(path: Path) -> str | None:
    try:
        words = path.read_text().split()
    except OSError:
        return None
    return words[words.index("token") + 1] if "token" in words[:-1] else None


def held_lock_env(root: Path) -> dict[str, str]:
    """{LOCK_ENV: token} for a child process that writes into `root` while this process holds its lock."""
    token = _held.get(str((root / ".lock").resolve()))
    return {LOCK_ENV: token} if token else {}


def check_inputs(cfg: ExperimentConfig, stage: str, round_: int) -> None:
    """Refuse to start a stage whose input stage (one of this experiment's) has no finished result: it would read
    partial or missing files (one shard short, no pairs.jsonl) and fail late, or worse, not fail."""
    from prefopt.data.errors import DataError
    from prefopt.stage import input_stages

    for name, r in input_stages(cfg, stage, round_):
        if name in cfg.stages and not (stage_dir(cfg, name, r) / MARKER).exists():
            label = name if r == 1 else f"{name} (round {r})"
            raise DataError(stage_dir(cfg, name, r), None, None,
                            f"input stage {label} of {stage} has not finished; run it first "
                            f"(prefopt run {cfg.config_path or 'CONFIG'} --only {name})")


def plan(cfg: ExperimentConfig) -> list[tuple[str, int]]:
    """(stage, round) in execution order: the one-off stages, then the round stages once per round."""
    steps = [(s, 1) for s in cfg.stages if s not in ROUND_STAGES]
    for r in range(1, cfg.iterations + 1):
        steps += [(s, r) for s in cfg.stages if s in ROUND_STAGES]
    return steps


def replicate_plan(cfg: ExperimentConfig) -> list[tuple[str, int, ExperimentConfig]]:
    """(stage, round, config) in execution order: `plan`, with each replicated stage once per seed (its config
    the replicate's, `for_seed`) and each other stage once (the experiment's config)."""
    out = []
    for s, r in plan(cfg):
        if replicated_stage(cfg, s, r):
            out += [(s, r, for_seed(cfg, seed)) for seed in cfg.seed_list]
        else:
            out.append((s, r, cfg))
    return out


def step_label(cfg: ExperimentConfig, stage: str, round_: int) -> str:
    """`dpo`, `dpo (round 2)`, `dpo (seed 43)`: how a step is named in what `prefopt run` prints."""
    parts = [f"round {round_}"] if cfg.iterations > 1 else []
    if cfg.replicate_seed is not None and replicated_stage(cfg, stage, round_):
        parts.append(f"seed {cfg.replicate_seed}")
    return f"{stage} ({', '.join(parts)})" if parts else stage


# A stage's own one-line user error (exits.user_error), at the start of a line or after a progress bar's \r; what a
# launcher prints after it is its report of a failed child (torchrun's ChildFailedError traceback under
# --multi_gpu, where --quiet does not apply): noise to drop.
_USER_ERROR_LINE = re.compile(rb"(?:^|[\n\r])prefopt: (?:(?:config error|data error|lock error|resource error|"
                              rb"interrupted): |[\w-]+ preempted at step )[^\n]*\n")


def relay_stderr(stream) -> None:
    """Copy a launched stage's stderr to ours as it comes (progress bars included), up to and including its
    one-line user error, if it prints one; nothing after it."""
    tail = b""
    while True:
        chunk = os.read(stream.fileno(), 1 << 16)
        if not chunk:
            break
        seen = tail + chunk
        m = _USER_ERROR_LINE.search(seen)
        if m:
            _write_stderr(chunk[: max(m.end() - len(tail), 0)])
            for _ in iter(lambda: os.read(stream.fileno(), 1 << 16), b""):
                pass  # drained, not shown
            break
        _write_stderr(chunk)
        tail = seen[-4096:]


def _write_stderr(data: bytes) -> None:
    out = getattr(sys.stderr, "buffer", None)  # a test's StringIO has no bytes buffer
    if out is not None:
        sys.stderr.flush()
        out.write(data)
        out.flush()
    else:
        sys.stderr.write(data.decode("utf-8", errors="replace"))


MACHINE_RANK = "__MACHINE_RANK__"  # replaced by $SLURM_NODEID, expanded on each node by srun's shell


LAUNCHER = [sys.executable, "-m", "accelerate.commands.launch"]


def simple_launch(cmd: list[str]) -> tuple[list[str], dict[str, str]] | None:
    """The stage's own command and environment, when `accelerate launch` would start it with its simple launcher
    (one process; no DeepSpeed, FSDP, Megatron, multi-GPU or TPU from the flags or the config file): made here by
    accelerate's own code (`_validate_launch_command`, `prepare_simple_launcher_cmd_env`) from this process's
    environment, which the launcher would inherit, so the stage starts directly. The launcher process did nothing
    else, and its Python start and imports cost 1.5 s a stage (7.5 s of the quickstart). None: `cmd` runs as it
    is (torchrun for several processes, srun across nodes)."""
    if cmd[:len(LAUNCHER)] != LAUNCHER:
        return None
    try:  # accelerate's own (private) launcher steps; any change in them, or a refusal, is accelerate's to report
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser
        from accelerate.utils import ComputeEnvironment, prepare_simple_launcher_cmd_env

        with redirect_stderr(io.StringIO()):  # argparse's complaint: accelerate launch prints it
            args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[len(LAUNCHER):]))
    except (Exception, SystemExit):
        return None  # `accelerate launch` runs as before and says what it says
    distributed = any((args.use_deepspeed, args.use_fsdp, args.use_megatron_lm, args.multi_gpu, args.tpu))
    if (distributed and not args.cpu) or (defaults is not None and
                                          defaults.compute_environment == ComputeEnvironment.AMAZON_SAGEMAKER):
        return None  # accelerate's launch_command would not take simple_launcher
    return prepare_simple_launcher_cmd_env(args)


def launch_command(cfg: ExperimentConfig, stage: str, round_: int, overrides: list[str]) -> list[str]:
    """`accelerate launch [--config_file F] [--num_processes N] -m prefopt STAGE CONFIG --round R overrides`;
    with `launch.srun`, that command once per node under `srun` (see `slurm_command`)."""
    launch = cfg.launch
    config_file = launch.accelerate_config
    processes = launch.num_processes
    srun = launch.srun
    cmd = list(LAUNCHER)
    if config_file:
        cmd += ["--config_file", config_file]
    if processes > 1:
        cmd += ["--num_processes", str(processes)]
        if not config_file:
            cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    elif not config_file:
        cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if srun:
        if "--num_machines" in cmd:  # the CLI's value wins over a config file's anyway; say it once
            del cmd[cmd.index("--num_machines"): cmd.index("--num_machines") + 2]
        cmd += ["--num_machines", str(launch.num_machines), "--machine_rank", MACHINE_RANK,
                "--main_process_ip", launch.main_process_ip or slurm_head_node(),
                "--main_process_port", str(launch.main_process_port)]
    # --quiet: a failed stage ends with its own one-line error, not accelerate's CalledProcessError traceback
    cmd += ["--quiet", "-m", "prefopt", stage, cfg.config_path, "--round", str(round_)]
    if cfg.replicate_seed is not None and replicated_stage(cfg, stage, round_):
        cmd += ["--replicate-seed", str(cfg.replicate_seed)]
    cmd += overrides
    return slurm_command(cmd, launch.num_machines) if srun else cmd


def slurm_command(cmd: list[str], nodes: int) -> list[str]:
    """`srun --nodes=N --ntasks-per-node=1 bash -c '<accelerate launch ... --machine_rank $SLURM_NODEID ...>'`:
    one accelerate launcher per node, each starting that node's processes; the rank is expanded on the node."""
    inner = shlex.join(cmd).replace(shlex.quote(MACHINE_RANK), '"$SLURM_NODEID"')
    return ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c", inner]


def slurm_head_node() -> str:
    """The first host of the Slurm allocation (machine rank 0), for `--main_process_ip`."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("launch.srun: not inside a Slurm allocation (no SLURM_JOB_NODELIST); run under sbatch or "
                         "salloc, or set launch.main_process_ip")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def threads_per_process(omp: str | None, num_processes: int, num_machines: int = 1) -> str | None:
    """OMP_NUM_THREADS for each of a node's processes: the node's thread budget (OMP_NUM_THREADS as given, else its
    cores) split between them. Two CPU processes with 2 threads each on 2 cores spin against each other: the
    quickstart's PPO stage took 148 s instead of 24 s. None: one process, leave it as it is."""
    per_node = max(1, num_processes // max(1, num_machines))
    if per_node == 1:
        return None
    budget = int(omp) if omp and omp.isdigit() and int(omp) > 0 else (os.cpu_count() or 1)
    return str(max(1, budget // per_node))


def run_one(cfg: ExperimentConfig, stage: str, round_: int, overrides: list[str], fresh: bool = False) -> None:
    training = STAGES[stage][1]
    if training and cfg.launch.launcher == "accelerate":
        cmd = launch_command(cfg, stage, round_, overrides)
        exit_file = cfg.root / f".exit-{stage}-{round_}-{os.getpid()}.json"
        exit_file.unlink(missing_ok=True)
        ours = {**held_lock_env(cfg.root), EXIT_FILE_ENV: str(exit_file)}
        env = {**os.environ, **ours}
        threads = threads_per_process(env.get("OMP_NUM_THREADS"), cfg.launch.num_processes, cfg.launch.num_machines
                                      if cfg.launch.srun else 1)
        if threads is not None:
            env["OMP_NUM_THREADS"] = threads
        simple = simple_launch(cmd) if threads is None else None
        if simple is not None:
            simple = simple[0], {**simple[1], **ours}
        warm = simple is not None and cfg.launch.preload and forkserver.fits(simple[1])
        # the accelerate command either way: what a user copies to run the stage alone
        print(f"[prefopt] $ {shlex.join(cmd)}" + ("" if simple is None else
                                                   "  (its simple launcher run here: the stage starts directly"
                                                   + (", forked with its imports done)" if warm else ")")), flush=True)
        if simple is not None:
            cmd, env = simple
        from prefopt.runtime.faults import PreemptedError, forward_signals

        # its own session: a signal to this process reaches the stage through forward_signals, once
        proc = None
        if warm:
            try:
                proc = forkserver.Stage(cmd, env)
            except (OSError, EOFError) as e:  # the server failed (its log says why): start the stage the usual way
                print(f"[prefopt] the forkserver did not start {stage} ({e}); starting it fresh", flush=True)
        if proc is None:
            proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, start_new_session=True)
        with forward_signals(proc) as got:
            relay_stderr(proc.stderr)
            proc.wait()
        if proc.returncode != 0:
            told = json.loads(exit_file.read_text()) if exit_file.exists() else None
            exit_file.unlink(missing_ok=True)
            if told:  # a user error (or an interrupt) the stage already printed in one line: pass its code on
                raise StageFailed(int(told["code"]))
            raise StageFailed(1, f"stage {stage} (round {round_}) crashed with exit code {proc.returncode} (its "
                              "traceback is above); rerun the same command to resume from its last checkpoint")
        if got.signum:  # it arrived during the stage's final save, which finished: stop before the next stage
            raise PreemptedError(stage, None, got.signum, None)
    else:
        run_stage(cfg, stage, round_, fresh)  # (launched stages never reuse files: RESUMABLE_FILES are in-process)


def start_forkserver(cfg: ExperimentConfig, stages: list[str]) -> None:
    """Start the forkserver that one-process launched stages fork from with their imports done
    (runtime/forkserver.py), in the environment accelerate's simple launcher would give them, while the stages
    before them run. Nothing when no stage would use it."""
    training = [s for s in stages if STAGES[s][1]]
    if not (training and cfg.launch.launcher == "accelerate" and cfg.launch.preload and forkserver.available()):
        return
    import torch

    if torch.cuda.is_available():  # see forkserver.py: a CUDA driver an import initialised does not survive a fork
        return
    if threads_per_process(os.environ.get("OMP_NUM_THREADS"), cfg.launch.num_processes,
                           cfg.launch.num_machines if cfg.launch.srun else 1) is not None:
        return
    simple = simple_launch(launch_command(cfg, training[0], 1, []))
    if simple is not None:
        log = cfg.root / "logs" / "forkserver.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        forkserver.start(simple[1], str(log))


def shared_wandb_service(cfg: ExperimentConfig) -> None:
    """Start W&B's service process here, before any stage's output is captured, so that every stage (in this
    process, and launched ones, which find it through the environment) logs through this one. A service a stage
    started would inherit the stage's captured stdout and stderr and outlive the stage: its log reader then waited
    for those pipes to close, about 10 s a stage (5 s a pipe), more than half of the quickstart's W&B cost."""
    if wandb_mode(cfg.wandb.mode) != "disabled":
        import wandb

        wandb.setup()


def run_experiment(cfg: ExperimentConfig, from_stage: str | None = None, only: str | None = None,
                   overrides: list[str] | None = None, verbose: bool = False) -> dict:
    """Every stage in order. The console gets a start and an end line per stage (what ran, where, its wall time
    and key figures), the gate and the final table; the rest of a stage's output goes to its log
    (runtime/console.py), unless `verbose` (or PREFOPT_VERBOSE=1)."""
    overrides = list(overrides or [])
    loud = console_verbose(verbose)
    if cfg.launch.launcher == "accelerate" and not cfg.config_path:
        raise ValueError("launching stages through accelerate needs the experiment loaded from a YAML file")
    # `prefopt check`'s checks, before any stage: a problem stops here in one line, before a model loads
    notes, problems, warnings, _, derived = preflight(cfg, here=True)
    for n in notes:
        print(f"[prefopt] global batch: {n}", flush=True)
    for w in warnings:
        print(f"WARNING: {w}", flush=True)
    if problems:
        from prefopt.config import ConfigError

        raise ConfigError("; ".join(problems) + (f" ({len(problems)} problems; `prefopt check` lists them)"
                                                 if len(problems) > 1 else ""))
    overrides += derived
    steps = replicate_plan(cfg)
    t0 = time.time()
    shared_wandb_service(cfg)
    with experiment_lock(cfg.root):
        forced = set()
        if from_stage:
            first = ORDER.index(from_stage)
            for s, r, scfg in steps:  # from `from_stage` on, start clean: no partial outputs to resume; a finished
                if ORDER.index(s) >= first:  # result stays until its replacement is finished
                    d = stage_dir(scfg, s, r)
                    forced.add(d)
                    shutil.rmtree(next_dir(d), ignore_errors=True)
                    if not (d / MARKER).exists():
                        (d / FINGERPRINT).unlink(missing_ok=True)  # prepare_dir then clears the partial outputs
        for s, r, scfg in steps:
            if only and s != only:
                continue
            label, d = step_label(scfg, s, r), stage_dir(scfg, s, r)
            recover_swap(d)  # a kill between a rerun's marker and its swap: finish the swap
            done, why = (False, "--from") if d in forced else stage_status(scfg, s, r)
            if done:
                print(f"[prefopt] {label}: finished with the same fingerprint, skipped", flush=True)
                if s == "reward":
                    reward_gate(scfg, r)
                continue
            check_inputs(scfg, s, r)
            start_forkserver(cfg, [x for x, _, _ in steps if not only or x == only])  # once; imports while this runs
            log = stage_log_path(d)
            print(f"[prefopt] {label}: running ({why}) -> {d}" + ("" if loud else f"; its output: {log}"),
                  flush=True)
            t_stage = time.time()
            with StageOutput(log, loud, header=f"{label} ({why})"):
                run_one(scfg, s, r, overrides, fresh=d in forced)
            record_timing(scfg, s, r, time.time() - t_stage)
            print(end_line(label, d, time.time() - t_stage), flush=True)
            if s == "reward":
                reward_gate(scfg, r)
    wall = experiment_wall_seconds(cfg)
    result = {"experiment": cfg.name, "root": str(cfg.root), "wall_seconds": wall,
              "this_invocation_seconds": round(time.time() - t0, 1)}
    final_eval = stage_dir(cfg, "evaluate", cfg.iterations) / "summary.json"
    if "evaluate" in cfg.stages and replicated_stage(cfg, "evaluate", cfg.iterations):
        path = replicate_table(cfg)
        if path is not None:
            result["replicates"] = str(path)
    elif "evaluate" in cfg.stages and final_eval.exists():
        summary = json.loads(final_eval.read_text())
        summary["stage_wall_seconds"] = summary.get("stage_wall_seconds", summary.get("wall_seconds"))
        summary["wall_seconds"] = wall
        write_json(final_eval, summary)
        reward_summary = stage_dir(cfg, "reward", 1) / "summary.json"
        print_table(summary, json.loads(reward_summary.read_text()) if reward_summary.exists() else None)
        result["evaluate"] = str(final_eval)
        print(f"[prefopt] figures: {final_eval} (table: {final_eval.parent / 'table.md'}); "
              f"`prefopt report {cfg.root}` draws them", flush=True)
    print_counts(cfg)
    if cfg.push_to_hub:
        from prefopt.push import publish

        result["pushed"] = [str(x) for x in publish(cfg)]
    line = wandb_line(cfg)
    if line:
        print(line, flush=True)
    print(f"[prefopt] experiment {cfg.name}: {wall:.0f} s of stage time in all; outputs under {cfg.root}/", flush=True)
    return result


def key_figures(stage: str, summary: dict) -> str:
    """`loss 0.092, rewards/accuracies 1.000, steps 126` from a stage's summary: its `HEADLINE_FIGURES`, each with
    ± its `<key>_se` where the summary has one (evaluate: each policy's gold, else win rate against the reference
    answers, else RM score, else KL)."""
    if stage == "evaluate":  # the gold score where the task has one, else AlpacaEval's figure, else RM score, KL
        policies = summary.get("policies") or {}
        key, name = next(((k, n) for k, n in (("gold_score", "gold"), ("win_rate_vs_ref", "ref win"),
                                              ("rm_score", "rm"), ("kl_to_sft", "KL"))
                          if any(k in f for f in policies.values())), (None, ""))
        return ", ".join(f"{p} {name} {_cell(figs, key)}" for p, figs in policies.items() if key in figs)
    out = []
    for key in HEADLINE_FIGURES.get(stage, []):
        v = summary.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out.append(f"{key} {v}" if isinstance(v, int) else f"{key} {_cell(summary, key)}")
    return ", ".join(out)


def end_line(label: str, d: Path, seconds: float) -> str:
    """`[prefopt] dpo: done in 7.3 s -> runs/quickstart/dpo (loss 0.092, ...)`."""
    try:
        summary = json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    figs = key_figures(label.split(" ")[0], summary)
    return f"[prefopt] {label}: done in {seconds:.1f} s -> {d}" + (f" ({figs})" if figs else "")


def wandb_line(cfg: ExperimentConfig) -> str | None:
    """One line for the experiment's offline W&B runs (each stage has one) and the command that uploads them."""
    runs = [p for p in sorted(cfg.root.glob("**/wandb/offline-run-*"))
            if not any(part.startswith(".") for part in p.relative_to(cfg.root).parts)]
    if not runs:
        return None
    depths = sorted({len(p.parent.parent.relative_to(cfg.root).parts) for p in runs})  # dpo: 1, round2/dpo: 2
    globs = " ".join(str(cfg.root) + "/*" * depth + "/wandb/offline-run-*" for depth in depths)
    return (f"[prefopt] W&B: {len(runs)} offline runs in group {cfg.wandb.group or cfg.name}; upload with: "
            f"wandb sync {globs}")


def replicate_table(cfg: ExperimentConfig) -> Path | None:
    """After a replicated run: every seed's final evaluate summary aggregated (prefopt.analysis.replicates) into
    `<root>/replicates.json` and `replicates.md`, and the table printed. None when no seed has finished."""
    from prefopt.analysis.replicates import aggregate, table_lines

    summaries = {}
    for seed in cfg.seed_list:
        path = stage_dir(for_seed(cfg, seed), "evaluate", cfg.iterations) / "summary.json"
        if path.exists():
            summaries[seed] = json.loads(path.read_text())
    if not summaries:
        return None
    agg = aggregate(summaries)
    missing = [s for s in cfg.seed_list if s not in summaries]
    write_json(cfg.root / "replicates.json", {**agg, "missing_seeds": missing})
    lines = table_lines(agg)
    reward = stage_dir(cfg, "reward", 1) / "summary.json"
    line = reward_line(json.loads(reward.read_text())) if reward.exists() else None
    if line and not replicated_stage(cfg, "reward", 1):
        lines.append(line)
    if missing:
        lines.append(f"WARNING: seeds {missing} have no finished evaluate stage; the figures are over "
                     f"{len(summaries)} seeds")
    for seed, summary in summaries.items():
        lines += [f"WARNING (seed {seed}): {w}" for w in summary.get("warnings") or []]
    text = "\n".join(lines)
    (cfg.root / "replicates.md").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    print(f"[prefopt] figures over seeds: {cfg.root / 'replicates.json'} (table: {cfg.root / 'replicates.md'}); "
          f"each seed's own in {cfg.root}/seed-<s>/evaluate/; `prefopt report {cfg.root}` draws the seeds' points",
          flush=True)
    return cfg.root / "replicates.json"


def print_counts(cfg: ExperimentConfig) -> None:
    """The table's footer: every stage's skipped, dropped, deduplicated and truncated rows, with the reason."""
    from prefopt.data.counts import describe

    for s, r, scfg in replicate_plan(cfg):
        path = stage_dir(scfg, s, r) / "summary.json"
        try:
            counts = json.loads(path.read_text()).get("counts") if path.exists() else None
        except ValueError:
            counts = None
        if counts:
            print(f"[prefopt] {step_label(scfg, s, r)}: {describe(counts)}", flush=True)


def reward_gate(cfg: ExperimentConfig, round_: int) -> None:
    """Stop the run (RewardGateError, exit code 5) unless the reward model is above `reward.min_eval_accuracy`
    beyond noise (reward/gate.py)."""
    from prefopt.reward.gate import RewardGateError, gate_message, lower_bound

    path = stage_dir(cfg, "reward", round_) / "summary.json"
    if not path.exists():
        return
    summary = json.loads(path.read_text())
    msg = gate_message(summary, cfg.reward.min_eval_accuracy, str(path.parent))
    if msg:
        raise RewardGateError(msg)
    if summary.get("eval/accuracy") is not None:
        print(f"[prefopt] reward model: held-out accuracy {summary['eval/accuracy']:.3f} ± "
              f"{summary.get('eval/accuracy_se', 0):.3f} (95% interval down to {lower_bound(summary):.3f}) >= "
              f"reward.min_eval_accuracy {cfg.reward.min_eval_accuracy:g}: passes the gate", flush=True)


def timing_key(cfg: ExperimentConfig, stage: str, round_: int) -> str:
    """`dpo@1`, or `dpo@1@seed-43` for a replicate's stage."""
    if cfg.replicate_seed is not None and replicated_stage(cfg, stage, round_):
        return f"{stage}@{round_}@seed-{cfg.replicate_seed}"
    return f"{stage}@{round_}"


def record_timing(cfg: ExperimentConfig, stage: str, round_: int, seconds: float) -> None:
    """Wall time of each finished stage as `prefopt run` saw it (process start-up included)."""
    path = cfg.root / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[timing_key(cfg, stage, round_)] = round(seconds, 2)
    write_json(path, timings)


def experiment_wall_seconds(cfg: ExperimentConfig) -> float:
    """The experiment's wall time: each stage's time as `prefopt run` measured it (or, for a stage run on its
    own, its recorded time), so a resumed experiment still reports the time its stages took."""
    path = cfg.root / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    total = 0.0
    for s, r, scfg in replicate_plan(cfg):
        key = timing_key(scfg, s, r)
        if key in timings:
            total += timings[key]
            continue
        p = stage_dir(scfg, s, r) / "summary.json"
        if p.exists():
            d = json.loads(p.read_text())
            total += float(d.get("stage_wall_seconds", d.get("wall_seconds", 0.0)))
    return round(total, 1)


TABLE_COLUMNS = [("gold_score", "gold"), ("gold_gain", "gold - SFT"), ("win_rate_vs_sft_gold", "win (gold)"),
                 ("rm_score", "RM"), ("win_rate_vs_sft", "win (RM)"), ("win_rate_vs_sft_lc", "LC win (RM)"),
                 ("kl_to_sft", "KL to SFT"), ("kl_to_sft_bound", "KL bound"), ("length", "length"),
                 ("judge_win_rate", "judge win"), ("judge_win_rate_lc", "LC judge win"),
                 ("win_rate_vs_ref_gold", "ref win (gold)"), ("win_rate_vs_ref", "ref win (RM)"),
                 ("win_rate_vs_ref_lc", "LC ref win (RM)"), ("judge_win_rate_vs_ref", "ref win (judge)"),
                 ("judge_win_rate_vs_ref_lc", "LC ref win (judge)")]


def _cell(figs: dict, key: str) -> str:
    v, se = figs.get(key), figs.get(key + "_se")
    if not isinstance(v, (int, float)):
        return "-"
    if isinstance(se, (int, float)) and se > 0:
        return f"{v:.3f} ± {se:.3f}"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}"  # tokens/s: 5,120, not 5120.000


def print_table(summary: dict, reward: dict | None = None) -> None:
    """The end-of-run table: each figure ± its standard error over prompts, the split it is on, the reward model's
    held-out accuracy, and every warning of the evaluate stage in words."""
    policies = summary.get("policies", {})
    if not policies:
        return
    cols = [(k, h) for k, h in TABLE_COLUMNS if any(isinstance(p.get(k), (int, float)) for p in policies.values())]
    rows = [[name] + [_cell(figs, k) for k, _ in cols] for name, figs in policies.items()]
    widths = [max(len(r[i]) for r in rows + [["policy"] + [h for _, h in cols]]) for i in range(len(cols) + 1)]
    judges = [j for k, j in (("win_rate_vs_sft_gold", "gold"), ("win_rate_vs_sft", "the reward model"),
                             ("judge_win_rate", "the judge")) if k in dict(cols)]
    wins = (f"; win rates against {summary.get('baseline') or 'the baseline'}, by {' and by '.join(judges)}"
            if judges else "")
    print(f"Figures on {summary.get('num_prompts', '?')} {summary.get('split', '')} prompts x "
          f"{summary.get('samples_per_prompt', '?')} samples (± one standard error over prompts{wins}):")
    head = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(["policy"] + [h for _, h in cols],
                                                                                   widths)))
    print(head)
    print("-" * len(head))
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for line in (reference_line(summary.get("reference") or {}), reward_line(reward or {})):
        if line:
            print(line)
    for w in summary.get("warnings") or []:
        print(f"WARNING: {w}")


def reference_line(ref: dict) -> str | None:
    """What the `ref win` columns compare with: the reference answers' file and their own figures."""
    if not ref:
        return None
    own = [f"{label} {_cell(ref, key)}" for key, label in (("gold_score", "gold"), ("rm_score", "RM"),
                                                          ("length", "length")) if ref.get(key) is not None]
    return (f"ref win: each policy's samples against the reference answers of {ref.get('path')} "
            f"({', '.join(own) or 'no figures'}), ties 1/2")


def reward_line(reward: dict) -> str | None:
    """The reward model's held-out accuracy under the table, or None when it has none."""
    if reward.get("eval/accuracy") is None:
        return None
    line = (f"reward model: held-out pairwise accuracy {reward['eval/accuracy']:.3f} ± "
            f"{reward.get('eval/accuracy_se', 0):.3f} on {reward.get('eval/pairs')} test pairs")
    if reward.get("eval/gold_accuracy") is not None:
        line += f", against gold {reward['eval/gold_accuracy']:.3f} ± {reward.get('eval/gold_accuracy_se', 0):.3f}"
    return line


def preflight(cfg: ExperimentConfig, here: bool = False) -> tuple[list[str], list[str], list[str], list[str],
                                                                    list[str]]:
    """What `prefopt check` and `prefopt run` check before any stage: (notes, problems, warnings, memory plan lines,
    overrides). The global batch is kept at each recipe's value first (cfg is changed in place, and the overrides
    carry the change to launched stages), so both print the same fingerprints. `here` (`prefopt run`): a file or
    model folder missing on this machine is a problem, not a warning."""
    from prefopt.checks import keep_recipe_batch, memory_plan, problems_and_warnings

    notes, _, overrides = keep_recipe_batch(cfg)
    problems, warnings = problems_and_warnings(cfg, here)  # its problems include keep_recipe_batch's
    try:
        plan_lines, over = memory_plan(cfg)
    except Exception as e:  # noqa: BLE001  an estimate must never stop a run: say why it is missing
        plan_lines, over = [], [f"memory plan not computed ({type(e).__name__}: {e})"]
    return notes, problems, warnings + over, plan_lines, overrides


def check(cfg: ExperimentConfig) -> int:
    """Validate and print the plan; returns 0, or 2 (the config error exit code) when a problem would stop the run."""
    notes, problems, warnings, plan_lines, _ = preflight(cfg)
    print(f"experiment {cfg.name}  ->  {cfg.root}")
    if cfg.replicated:
        shared = [s for s, r in plan(cfg) if not replicated_stage(cfg, s, r)]
        print(f"replicates: seeds {cfg.seed_list}; run once under seed {cfg.seed}: {', '.join(shared) or 'none'}")
    for n in notes:
        print(f"global batch: {n}")
    for s, r, scfg in replicate_plan(cfg):
        done, why = stage_status(scfg, s, r)
        state = "skip (done)" if done else f"run ({why})"
        launch = "accelerate" if STAGES[s][1] and cfg.launch.launcher == "accelerate" else "in-process"
        label = s if cfg.iterations == 1 else f"{s}@round{r}"
        if scfg.replicate_seed is not None:
            label += f"@seed-{scfg.replicate_seed}"
        print(f"  {label:<18} {fingerprint(scfg, s, r)}  {launch:<11} {state}")
    for line in plan_lines:
        print(line)
    for w in warnings:
        print(f"WARNING: {w}")
    for p in problems:
        print(f"ERROR: {p}")
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 2 if problems else 0
