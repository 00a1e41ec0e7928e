"""`prefopt sweep FILE`: run a W&B sweep file here, without a W&B server (grid and random search).

    prefopt sweep experiments/sweeps/dpo_beta.yaml [--max-trials N] [--dry-run] [--section.key=value ...]

The same file drives `wandb sweep` + `wandb agent` on a cluster. Locally:

- the trials are the cartesian product of each parameter's `values` (grid), or `run_cap` / `--max-trials` draws
  (random; seeded, so the same file gives the same trials);
- the experiment is the one the sweep's `command` runs (`prefopt run CONFIG ...`); its fixed `--key=value`
  arguments and the ones given here apply to every trial;
- each trial is its own experiment, `<experiment>-<sweep>-t<k>`, so its own run directory, with W&B group = the
  sweep name;
- stages the swept keys do not reach (same fingerprint in every trial, e.g. task, base, sft, reward, generate) run
  once, in the parent experiment's run directory `runs/<experiment>`, and each trial links to them
  (`reuse_upstream`), so `prefopt run` skips them there: a trial trains only what its values change;
- `runs/sweeps/<sweep>/trials.csv` and `trials.md` hold every trial's swept values, status and final evaluate
  figures, rebuilt after every trial from the trials' own records (their completion markers, evaluate summaries
  and `sweep_trial.json`, the outcome of their last attempt) and replaced atomically under a lock: two agents of
  one sweep file at once, or a rerun, show every finished trial as finished.

Several agents at once (`prefopt sweep` twice, as two `wandb agent`s): the shared stages run in one, the other
waits for its lock; a trial another agent is running (its experiment lock is held) is left to it.
"""

from __future__ import annotations

import csv
import fcntl
import io
import itertools
import json
import math
import os
import random
import shlex
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefopt.config import ConfigError, load_yaml

from prefopt.experiment import load_config

# W&B command macros that mean nothing here (the interpreter and `env` are this process)
_DROPPED_MACROS = {"${env}", "${interpreter}"}
# Figures of each evaluated policy that go into the trials table
TABLE_FIGURES = ["gold_score", "rm_score", "win_rate_vs_sft", "kl_to_sft", "length"]


@dataclass
class Sweep:
    """A parsed sweep file: what to vary and which experiment to run."""

    name: str
    method: str
    parameters: dict[str, dict]
    """Dotted config key -> W&B parameter spec (`values`, `value`, or `distribution` with `min`/`max`)."""
    config: str
    """The experiment YAML the sweep's command runs."""
    fixed_args: list[str] = field(default_factory=list)
    """`--key=value` arguments the command passes to every trial."""
    metric: dict = field(default_factory=dict)
    run_cap: int = 0
    path: str = ""


def _flatten_parameters(params: dict, prefix: str = "") -> dict[str, dict]:
    """W&B allows nesting (`dpo: {parameters: {beta: {...}}}`); we use dotted keys either way."""
    out = {}
    for name, spec in params.items():
        key = f"{prefix}{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"sweep parameter {key!r}: expected a mapping (values / value / distribution)")
        if "parameters" in spec:
            out.update(_flatten_parameters(spec["parameters"], key + "."))
        else:
            out[key] = spec
    return out


def parse_command(command: list, program: str | None) -> tuple[str, list[str]]:
    """(experiment YAML, fixed `--key=value` args) from a sweep `command` such as
    `[${env}, prefopt, run, experiments/quickstart.yaml, --stages=[...], ${args}]`."""
    parts = []
    for c in command:
        c = str(c)
        if c in _DROPPED_MACROS:
            continue
        if c == "${program}":
            parts += shlex.split(program or "")
            continue
        if c.startswith("${"):  # ${args} and its variants: the swept values, added per trial
            continue
        parts.append(c)
    if "run" not in parts:
        raise ConfigError(f"sweep command {command!r} does not call `prefopt run CONFIG`; local sweeps need it")
    i = parts.index("run")
    if i + 1 >= len(parts):
        raise ConfigError(f"sweep command {command!r}: `run` is not followed by an experiment YAML")
    fixed = parts[i + 2:]
    bad = [a for a in fixed if not a.startswith("--")]
    if bad:
        raise ConfigError(f"sweep command: expected --key=value arguments after the config, got {bad}")
    return parts[i + 1], fixed


def load_sweep(path: str | Path) -> Sweep:
    data = load_yaml(path)
    method = data.get("method", "grid")
    if method not in ("grid", "random", "bayes"):
        raise ConfigError(f"{path}: method must be grid, random or bayes, got {method!r}")
    if not data.get("parameters"):
        raise ConfigError(f"{path}: no `parameters`")
    config, fixed = parse_command(data.get("command") or ["${env}", "${program}", "${args}"], data.get("program"))
    return Sweep(
        name=str(data.get("name") or Path(path).stem),
        method=method,
        parameters=_flatten_parameters(data["parameters"]),
        config=config,
        fixed_args=fixed,
        metric=data.get("metric") or {},
        run_cap=int(data.get("run_cap") or 0),
        path=str(path),
    )


def sample_value(spec: dict, rng: random.Random, key: str) -> Any:
    """One draw from a W&B parameter spec (the distributions W&B's random search supports that we need)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(list(spec["values"]))
    dist = spec.get("distribution", "uniform")
    try:
        lo, hi = spec["min"], spec["max"]
    except KeyError:
        if dist == "normal":
            return rng.gauss(spec.get("mu", 0.0), spec.get("sigma", 1.0))
        raise ConfigError(f"sweep parameter {key!r}: `{dist}` needs `min` and `max`") from None
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "log_uniform_values":  # min/max are the values themselves
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "log_uniform":  # min/max are natural logs (W&B's convention)
        return math.exp(rng.uniform(lo, hi))
    raise ConfigError(f"sweep parameter {key!r}: distribution {dist!r} is not supported locally "
                      "(use values, uniform, int_uniform, log_uniform_values, log_uniform or normal)")


def expand(sweep: Sweep, max_trials: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """The trials, each a {dotted key: value} dict. Grid: every combination, in file order (the first parameter
    varies slowest). Random (and bayes, which needs a server: run here as random): `max_trials`, else `run_cap`,
    else 10 draws."""
    keys = list(sweep.parameters)
    if sweep.method == "grid":
        axes = []
        for k in keys:
            spec = sweep.parameters[k]
            if "value" in spec:
                axes.append([spec["value"]])
            elif "values" in spec:
                axes.append(list(spec["values"]))
            else:
                raise ConfigError(f"grid sweep parameter {k!r} needs `values` (a distribution cannot be gridded)")
        trials = [dict(zip(keys, combo)) for combo in itertools.product(*axes)]
        return trials[:max_trials] if max_trials > 0 else trials
    if sweep.method == "bayes":
        print(f"[sweep] {sweep.name}: bayes search needs a W&B server; drawing random trials instead", flush=True)
    n = max_trials or sweep.run_cap or 10
    rng = random.Random(seed)
    return [{k: sample_value(sweep.parameters[k], rng, k) for k in keys} for _ in range(n)]


def format_value(v: Any) -> str:
    """A value as `wandb agent` would write it after `--key=` (str() of the Python value)."""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)


def trial_name(base: str, sweep: str, k: int) -> str:
    return f"{base}-{sweep}-t{k}"


def trial_args(sweep: Sweep, parent, values: dict, k: int, extra: list[str]) -> list[str]:
    """`prefopt run` arguments of trial k: fixed, extra, the swept values, its own name, the sweep's W&B group."""
    tags = list(dict.fromkeys([*parent.wandb.tags, f"sweep-{sweep.name}"]))
    return [
        sweep.config,
        *sweep.fixed_args,
        *extra,
        *(f"--{k_}={format_value(v)}" for k_, v in values.items()),
        f"--name={trial_name(parent.name, sweep.name, k)}",
        f"--wandb.group={sweep.name}",
        f"--wandb.tags=[{','.join(tags)}]",
    ]


# --------------------------------------------------------------------------------------- sharing upstream stages


def shared_steps(parent, trials) -> list[tuple[str, int]]:
    """(stage, round) whose fingerprint is the parent's in every trial: the stages the sweep does not touch."""
    from prefopt.pipeline import plan
    from prefopt.stage import fingerprint

    out = []
    for s, r in plan(parent):
        fp = fingerprint(parent, s, r)
        if all((s in t.stages and fingerprint(t, s, r) == fp) for t in trials):
            out.append((s, r))
    return out


def run_shared(parent, steps: list[tuple[str, int]], overrides: list[str]) -> None:
    """Run the shared steps once, in the parent experiment's run directory, as `prefopt run` would (skipping
    finished ones). Only these (stage, round) steps: a later round's generation depends on the swept policy."""
    from prefopt.pipeline import experiment_lock, record_timing, run_one
    from prefopt.stage import is_done

    labels = ", ".join(s if r == 1 else f"{s}@round{r}" for s, r in steps)
    print(f"[sweep] stages every trial shares, run once in {parent.root}: {labels}", flush=True)
    with _wait_for_lock(parent.root, experiment_lock):
        for s, r in steps:
            if is_done(parent, s, r):
                print(f"[sweep] {s}: finished with the same fingerprint, skipped", flush=True)
                continue
            t0 = time.time()
            run_one(parent, s, r, overrides)
            record_timing(parent, s, r, time.time() - t0)


class _wait_for_lock:
    """`experiment_lock(root)`, waiting while another agent of the sweep holds it (it is running the shared stages;
    they are then found finished)."""

    def __init__(self, root: Path, lock):
        self.root, self.lock, self.held = root, lock, None

    def __enter__(self):
        from prefopt.pipeline import LockedError

        said = False
        while True:
            held = self.lock(self.root)
            try:
                held.__enter__()
            except LockedError as e:
                if not said:
                    print(f"[sweep] waiting: {e}", flush=True)
                    said = True
                time.sleep(1.0)
                continue
            self.held = held
            return self

    def __exit__(self, *exc):
        return self.held.__exit__(*exc)


def reuse_upstream(parent, trial) -> list[str]:
    """Link each of the trial's stage folders to the parent's finished folder with the same fingerprint, so
    `prefopt run` skips it. A stale link (its fingerprint no longer matches) is removed. Returns the labels linked."""
    from prefopt.experiment import stage_dir
    from prefopt.pipeline import plan
    from prefopt.stage import fingerprint, is_done

    linked = []
    for s, r in plan(trial):
        dst = stage_dir(trial, s, r)
        same = s in parent.stages and fingerprint(parent, s, r) == fingerprint(trial, s, r) and is_done(parent, s, r)
        if dst.is_symlink() and not same:
            dst.unlink()  # made by an earlier sweep against another parent config
        if not same or dst.exists():
            continue  # the trial's own run (or a finished earlier one) stays as it is
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            dst.symlink_to(stage_dir(parent, s, r).resolve(), target_is_directory=True)
        except FileExistsError:  # another agent of the sweep linked it a moment ago
            continue
        linked.append(s if r == 1 else f"{s}@round{r}")
    return linked


# ----------------------------------------------------------------------------------------------------- the table


ATTEMPT = "sweep_trial.json"  # in a trial's run directory: the outcome of its last attempt


def lock_holder(root: Path) -> str | None:
    """"pid N" when a process holds the experiment lock `root/.lock` now, else None. Read from /proc/locks, never
    by trying the lock: a probe that took it for a moment would turn another agent starting the trial away."""
    try:
        ino = (Path(root) / ".lock").stat().st_ino
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in table.splitlines():
        f = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF"; a waiter's line has "->" after the number
        if len(f) >= 6 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(ino):
            return f"pid {f[4]}"
    return None


def record_attempt(cfg, k: int, values: dict, status: str) -> None:
    from prefopt.stage import write_json

    cfg.root.mkdir(parents=True, exist_ok=True)
    write_json(cfg.root / ATTEMPT, {"trial": k, "values": values, "status": status, "time": time.time(),
                                    "pid": os.getpid()})


def trial_status(cfg) -> str:
    """From the trial's own records: "ok" when every stage of its plan is finished (its markers hold), "running
    (pid N)" while a process holds its experiment lock, else its last attempt's outcome ("exit 2", "error"),
    "not finished" (an attempt ended well but a stage is no longer done), or "not run"."""
    from prefopt.pipeline import replicate_plan
    from prefopt.stage import is_done

    if cfg.root.is_dir() and all(is_done(c, s, r) for s, r, c in replicate_plan(cfg)):
        return "ok"
    holder = lock_holder(cfg.root)
    if holder:
        return f"running ({holder})"
    try:
        status = json.loads((cfg.root / ATTEMPT).read_text())["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return "not run"
    return "not finished" if status == "ok" else status


def trial_figures(cfg) -> dict[str, Any]:
    """The final round's evaluate figures, flattened as in the W&B run summary (`policies/dpo/gold_score`)."""
    from prefopt.experiment import stage_dir

    path = stage_dir(cfg, "evaluate", cfg.iterations) / "summary.json"
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())
    out = {}
    for name, figs in (summary.get("policies") or {}).items():
        for f in TABLE_FIGURES:
            if f in figs:
                out[f"policies/{name}/{f}"] = figs[f]
    return out


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_table(rows: list[dict], out_dir: Path, sweep: Sweep) -> tuple[Path, Path]:
    """trials.csv (every column) and trials.md (sorted by the sweep's metric when it has one), each written to a
    temporary name and renamed: a reader never sees half a table."""
    from prefopt.stage import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    csv_path = out_dir / "trials.csv"
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write(csv_path, buf.getvalue())
    metric, goal = sweep.metric.get("name"), sweep.metric.get("goal", "maximize")
    ordered = rows
    if metric and any(isinstance(r.get(metric), (int, float)) for r in rows):
        sign = -1 if goal == "maximize" else 1
        ordered = sorted(rows, key=lambda r: (not isinstance(r.get(metric), (int, float)),
                                              sign * (r.get(metric) or 0.0)))
    lines = [f"# Sweep `{sweep.name}` ({sweep.method}, {len(rows)} trials)", ""]
    if metric:
        lines += [f"Metric: `{metric}` ({goal}); rows best first.", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in ordered]
    md_path = out_dir / "trials.md"
    atomic_write(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def rebuild_table(sweep: Sweep, values: list[dict], trials: list, out_dir: Path) -> list[dict]:
    """Every trial's row from its own records (`trial_status`, `trial_figures`), the table rewritten. Under
    `out_dir/.trials.lock`: the agent that writes last also read last, so its view is the newest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".trials.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [{"trial": k, "name": cfg.name, "status": trial_status(cfg), **v, **trial_figures(cfg),
                 "run_dir": str(cfg.root)} for k, (v, cfg) in enumerate(zip(values, trials), 1)]
        write_table(rows, out_dir, sweep)
    return rows


# ------------------------------------------------------------------------------------------------------ the run


def run_trial(argv: list[str]) -> int:
    """`prefopt run CONFIG OVERRIDES...` in this process, its errors reported as the CLI reports them (one line and
    an exit code, `prefopt.runtime.exits`), so a trial fails exactly as the command would."""
    from prefopt.runtime.exits import log_file, run_reported
    from prefopt.pipeline import run_experiment

    holder: dict = {}

    def body() -> int:
        holder["cfg"] = load_config(argv[0], argv[1:])
        run_experiment(holder["cfg"], overrides=argv[1:])
        return 0

    return run_reported("run", body, lambda: log_file(holder.get("cfg"), "run"))


def check_trials(sweep: Sweep, trials: list, argvs: list[list[str]]) -> None:
    """`prefopt check`'s problems of every trial, before any stage runs: a problem the sweep's fixed command gives
    every trial (a prompts file no stage writes, a bad key) would otherwise fail each trial in turn after the shared
    stages had run."""
    import copy

    from prefopt.checks import problems_and_warnings

    for cfg, argv in zip(trials, argvs):
        problems, _ = problems_and_warnings(copy.deepcopy(cfg), here=True)  # (the batch check edits a config)
        if problems:
            more = f" (and {len(problems) - 1} more: `prefopt check {shlex.join(argv)}`)" if len(problems) > 1 else ""
            raise ConfigError(f"sweep {sweep.name}, trial {cfg.name}: {problems[0]}{more}")


def run_sweep(path: str | Path, max_trials: int = 0, dry_run: bool = False, extra: list[str] | None = None,
              seed: int = 0) -> list[dict]:
    """Run every trial of the sweep file here, one after another; returns the table's rows."""
    extra = list(extra or [])
    sweep = load_sweep(path)
    values = expand(sweep, max_trials, seed)
    parent = load_config(sweep.config, [*sweep.fixed_args, *extra])
    if "evaluate" in parent.stages and parent.evaluate.split != "validation":
        # a sweep is a choice: made on test prompts, the figures reported on them afterwards are optimistic
        raise ConfigError(f"sweep {sweep.name}: its trials are evaluated on the {parent.evaluate.split} split; add "
                          "--evaluate.split=validation to the sweep's command (choose on validation prompts, report "
                          "the winner on test)")
    argvs = [trial_args(sweep, parent, v, k, extra) for k, v in enumerate(values, 1)]
    print(f"[sweep] {sweep.name}: {sweep.method}, {len(values)} trial(s) of {parent.name} over "
          f"{', '.join(sweep.parameters)}", flush=True)
    if dry_run:
        for argv in argvs:
            print(shlex.join(["prefopt", "run", *argv]), flush=True)
        return [dict(v) for v in values]

    trials = [load_config(a[0], a[1:]) for a in argvs]
    check_trials(sweep, trials, argvs)
    shared = shared_steps(parent, trials)
    out_dir = Path(parent.output_dir) / "sweeps" / sweep.name
    if shared:
        run_shared(parent, shared, [*sweep.fixed_args, *extra])
    for k, (v, argv, cfg) in enumerate(zip(values, argvs, trials), 1):
        holder = lock_holder(cfg.root)
        if holder:
            print(f"[sweep] trial {k}/{len(values)} {cfg.name}: another process runs it ({holder}); left to it",
                  flush=True)
            continue
        linked = reuse_upstream(parent, cfg)
        print(f"[sweep] trial {k}/{len(values)} {cfg.name}: "
              + ", ".join(f"{key}={format_value(x)}" for key, x in v.items())
              + (f" (reusing {', '.join(linked)})" if linked else ""), flush=True)
        status = "ok"
        try:
            rc = run_trial(argv)
            status = "ok" if rc == 0 else f"exit {rc}"
        except SystemExit as e:  # a training subprocess failed; the next trial still runs, as with wandb agent
            status = f"exit {e.code}"
        except Exception:  # noqa: BLE001 - one broken trial must not lose the others' results
            traceback.print_exc()
            status = "error"
        if status != "exit 4":  # 4: another agent took the trial's lock first; the outcome is its to record
            record_attempt(cfg, k, v, status)
        rebuild_table(sweep, values, trials, out_dir)
    rows = rebuild_table(sweep, values, trials, out_dir)
    print(f"[sweep] {sweep.name}: {len(rows)} trial(s); table in {out_dir / 'trials.md'} and "
          f"{out_dir / 'trials.csv'}", flush=True)
    print((out_dir / "trials.md").read_text(), flush=True)
    return rows

