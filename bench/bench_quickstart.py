"""The quickstart's stage time, run after run, alone or alternated with another revision's code.

    OMP_NUM_THREADS=2 python bench/bench_quickstart.py --runs 2                  # this tree's code, twice
    OMP_NUM_THREADS=2 python bench/bench_quickstart.py --runs 2 --against d3cf3bd  # alternated with that commit

Each run is `python -m prefopt run experiments/quickstart.yaml` in a process of its own, into
`<workdir>/<label>-<i>`. The other revision's `src/` and `experiments/` come from `git archive` and are imported as
`prefopt` through PYTHONPATH. With --against the two codes take turns (A B B A ...), so a drift in the machine's
speed falls on both.

Printed, a row per run:
- each stage's seconds as `prefopt run` measured them (`timings.json`) and their total (the figure issue 24's
  150 s target is stated in);
- the seconds outside the stages' own clocks: `timings.json` minus each summary's `wall_seconds` (process start,
  W&B's start and finish, the fork), summed over the stages;
- how many of SFT's 20-step windows ran at the machine's fast rate. This 2-vCPU machine loses its second vCPU for
  stretches, and a step then takes ~1.4x as long (docs/performance.md). A window counts as fast within 15% of
  the fastest window of all the runs;
- whether every figure equals the first run's of the same code, and of the other code's
  (`bench/compare_runs.py`).

Run by hand, not by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from compare_runs import compare

from prefopt.runtime.tracking import read_metrics

ROOT = Path(__file__).resolve().parent.parent
STAGES = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())["stages"]


def snapshot(rev: str, into: Path) -> Path:
    """`rev`'s src/ (as prefopt/) and experiments/ under `into`, for PYTHONPATH."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src", "experiments"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "src").rename(into / "prefopt")
    return into


def run_once(code: Path | None, out: Path) -> dict:
    """One quickstart into `out` with this tree's code (code None) or a snapshot's; its stage seconds by name."""
    env = dict(os.environ)
    config = ROOT / "experiments" / "quickstart.yaml"
    if code is not None:
        env["PYTHONPATH"] = f"{code}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(code)
        config = code / "experiments" / "quickstart.yaml"
    shutil.rmtree(out, ignore_errors=True)
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "prefopt", "run", str(config), f"--output_dir={out}"],
                              env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"the quickstart failed (exit {done.returncode}); its output: {log}")
    timings = json.loads((out / "quickstart" / "timings.json").read_text())
    return {s: timings.get(f"{s}@1") for s in STAGES}


def outside_clock(root: Path, secs: dict) -> float:
    """Seconds `prefopt run` saw that no stage's own clock did (start-up, W&B, teardown), summed over the stages."""
    total = 0.0
    for stage, seconds in secs.items():
        path = root / stage / "summary.json"
        if seconds is None or not path.exists():
            continue
        summary = json.loads(path.read_text())
        inside = summary.get("stage_wall_seconds", summary.get("wall_seconds"))  # evaluate's holds the experiment's
        total += seconds - inside if isinstance(inside, (int, float)) else 0.0
    return total


def sft_windows(root: Path) -> list[float]:
    """ms a step in each window between two of SFT's logged rows (metrics.jsonl's `time`)."""
    marks = [(r["step"], r["time"]) for r in read_metrics(root / "sft")
             if "time" in r and isinstance(r.get("step"), int)]
    return [(t1 - t0) / (s1 - s0) * 1000 for (s0, t0), (s1, t1) in zip(marks, marks[1:]) if s1 > s0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2, help="runs of each code")
    p.add_argument("--against", default="", help="a git revision whose code takes turns with this tree's")
    p.add_argument("--workdir", default="", help="where the runs go (default: a new temporary folder)")
    args = p.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_quickstart-"))
    work.mkdir(parents=True, exist_ok=True)  # a --workdir not made yet
    codes: dict[str, Path | None] = {"this": None}
    if args.against:
        codes[args.against] = snapshot(args.against, work / "code" / args.against)
    order = [(label, i) for i in range(args.runs)
             for label in (list(codes) if i % 2 == 0 else list(codes)[::-1])]
    results = []
    for label, i in order:
        out = work / f"{label}-{i}"
        print(f"[bench] {label} run {i + 1}/{args.runs} -> {out}", flush=True)
        results.append((label, out, run_once(codes[label], out)))

    windows = {out: sft_windows(out / "quickstart") for _, out, _ in results}
    fastest = min((min(w) for w in windows.values() if w), default=0.0)  # no windows: SFT logged under 2 rows
    firsts = {}
    print("\n| code | run | " + " | ".join(STAGES) + " | total s | outside the stages' clocks | "
          "SFT windows at the fast rate | figures |")
    print("|---|---|" + "---|" * len(STAGES) + "---|---|---|---|")
    for label, out, secs in results:
        firsts.setdefault(label, out)
        same = []
        for other, first in firsts.items():
            if first != out:
                n, diffs = compare(first / "quickstart", out / "quickstart")
                same.append(f"{len(diffs)} of {n} differ from {other}'s first")
        w = windows[out]
        fast = sum(1 for x in w if x <= 1.15 * fastest)
        cells = " | ".join(f"{secs[s]:.1f}" if secs[s] is not None else "-" for s in STAGES)
        total = sum(v for v in secs.values() if v is not None)
        print(f"| {label} | {out.name} | {cells} | {total:.1f} | {outside_clock(out / 'quickstart', secs):.1f} | "
              f"{fast} of {len(w)} | {'; '.join(same) or '-'} |")
    print(f"\nfastest SFT window: {fastest:.1f} ms a step; runs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
