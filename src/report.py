"""`prefopt report RUN_DIR`: the analysis notebook's figures as PNGs and a markdown summary, for a finished run.

    prefopt report runs/quickstart            # -> runs/quickstart/report/report.md (+ *.png beside it)
    prefopt report runs/sweeps/dpo_beta       # a sweep: every trial's run, the frontier across trials

The summary holds the evaluate table (every round; in a replicated run one row per seed, and the table over seeds
with its paired differences and verdicts), each stage's wall time and key figures from its summary.json, the
chosen/rejected length gap of the pairs, and the figures of prefopt.analysis (a replicated run's per-seed points
in replicates.png).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from prefopt import analysis as A


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if pd.isna(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown_table(df: pd.DataFrame) -> list[str]:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return lines


def _load(run_dir: Path) -> tuple[dict[str, pd.DataFrame], pd.DataFrame | None]:
    """A run directory, or a sweep folder (trials.csv) whose trials are loaded side by side."""
    if (run_dir / "trials.csv").exists():
        table, dirs = A.sweep_runs(run_dir)
        return A.load_runs(dirs), table
    return A.load_run(run_dir), None


def warnings_section(run_dir: Path) -> list[str]:
    """The evaluate stage's warnings (reward model and gold disagreeing, over-optimisation), in words."""
    out = []
    for path in sorted(run_dir.glob("**/evaluate/summary.json")):
        s = A._read_json(path) or {}
        if s.get("split"):
            out.append(f"Figures of `{path.parent.relative_to(run_dir)}` are on the **{s['split']}** split "
                       f"({s.get('num_prompts')} prompts).")
        out += [f"- **warning**: {w}" for w in s.get("warnings") or []]
    return [*out, ""] if out else []


def reward_section(data: dict[str, pd.DataFrame]) -> list[str]:
    """The reward model's held-out (test-split) figures with standard errors, and the checkpoint it kept."""
    s = data["summaries"]
    if s.empty or "eval/accuracy" not in s.columns:
        return []
    lines = ["## Reward model", ""]
    for row in s[(s["stage"] == "reward") & s["eval/accuracy"].notna()].to_dict("records"):
        text = (f"Held-out pairwise accuracy {row['eval/accuracy']:.3f} ± {row.get('eval/accuracy_se', 0):.3f}, "
                f"margin {row.get('eval/margin', float('nan')):.3f} ± {row.get('eval/margin_se', 0):.3f} on "
                f"{int(row.get('eval/pairs', 0))} test pairs")
        if pd.notna(row.get("eval/gold_accuracy", float("nan"))):
            text += f"; against gold {row['eval/gold_accuracy']:.3f} ± {row.get('eval/gold_accuracy_se', 0):.3f}"
        if pd.notna(row.get("select/best_step", float("nan"))):
            text += (f". Kept step {int(row['select/best_step'])} (validation accuracy "
                     f"{row.get('select/accuracy', float('nan')):.3f}).")
        lines.append(text)
    return [*lines, ""]


def write_report(run_dir: str | Path) -> str:
    """Write `<run_dir>/report/report.md` and its PNG figures; returns the markdown file's path. Holds the
    experiment lock: the report is written inside the run directory, and a run writing summaries meanwhile would
    give a report of half a run (a held lock is a LockedError, exit code 4)."""
    from prefopt.pipeline import experiment_lock

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    with experiment_lock(run_dir):
        return _write_report(run_dir)


def _write_report(run_dir: Path) -> str:
    data, trials = _load(run_dir)
    out = run_dir / "report"
    figures = A.save_figures(data, out)

    lines = [f"# Report: `{run_dir.name}`", "", f"Run directory: `{run_dir}`", ""]
    stages = A.stage_table(data).drop_duplicates("path")  # a stage shared by sweep trials is listed once
    if len(stages):
        lines += [f"Stage wall time in all: {stages['wall_seconds'].fillna(0).sum():.0f} s", ""]
    if trials is not None:
        lines += ["## Sweep trials", "", *markdown_table(trials.drop(columns=["run_dir"], errors="ignore")), ""]

    lines += ["## Evaluation", ""]
    ev = A.evaluate_table(data)
    if ev.empty:
        lines += ["No evaluate stage has finished in this run.", ""]
    else:
        if ev["run"].nunique() == 1:
            ev = ev.drop(columns=["run"])
        lines += [*markdown_table(ev), "",
                  "gold_score: the task's programmatic reward; gold_gain: gold_score minus the SFT policy's on the "
                  "same prompts; win_rate_vs_sft_gold / win_rate_vs_sft: how often the policy's response beats the "
                  "SFT policy's on the same prompt by gold / by the reward model (each policy sampled independently "
                  "of the SFT policy); win_rate_vs_sft_lc: the reward model's length-controlled win rate "
                  "(AlpacaEval 2's regression, read at equal length); rm_score: the reward model's; kl_to_sft: "
                  "KL(policy || SFT) per response, Monte-Carlo (best-of-n: the exact KL under its samples, ties "
                  "counted; kl_to_sft_bound: the bound log n - (n-1)/n); length: mean response tokens; "
                  "judge_win_rate(_lc): the pairwise judge's, raw and length-controlled; *_vs_ref: the same "
                  "against the reference answers (evaluate.reference, AlpacaEval's way). Each `*_se` column is the "
                  "standard error over prompts.", ""]
    replicates = run_dir / "replicates.md"
    if replicates.exists():  # a replicated run: the figures over seeds, as `prefopt run` printed them
        lines += ["## Replicates", "", "```", *replicates.read_text(encoding="utf-8").splitlines(), "```", "",
                  "Each seed's own figures are the evaluation rows with a `seed` above; `replicates.png` draws them "
                  "(docs/methods.md, \"Replicates\").", ""]
    lines += warnings_section(run_dir)
    lines += reward_section(data)

    lines += ["## Stages", ""]
    if stages.empty:
        lines += ["No stage has a summary yet.", ""]
    else:
        rows = []
        for row in stages.to_dict("records"):
            figs = ", ".join(f"{k}={_fmt(v)}" for k, v in A.key_figures(row).items())
            rows.append({"run": row["run"], "stage": row["stage"], "round": row["round"],
                         "wall s": row["wall_seconds"], "key figures": figs or "-"})
        table = pd.DataFrame(rows)
        if table["run"].nunique() == 1:
            table = table.drop(columns=["run"])
        lines += [*markdown_table(table), ""]

    pairs = data["pairs"].dropna(subset=["chosen_len", "rejected_len"])
    if len(pairs):
        gap = (pairs["chosen_len"] - pairs["rejected_len"]).mean()
        longer = (pairs["chosen_len"] > pairs["rejected_len"]).mean()
        lines += ["## Preference pairs", "",
                  f"{len(pairs)} pairs; mean length chosen {pairs['chosen_len'].mean():.1f}, rejected "
                  f"{pairs['rejected_len'].mean():.1f} tokens (gap {gap:+.2f}); the chosen response is the longer "
                  f"one in {longer:.0%} of pairs. A large positive gap invites length exploitation.", ""]

    lines += ["## Figures", ""]
    for name, path in figures.items():
        lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({path.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return str(md)
