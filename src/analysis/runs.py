"""Runs into pandas, and the figures the notebook and `prefopt report` draw.

    from prefopt import analysis as A
    data = A.load_run("runs/quickstart")            # or A.load_runs([...]) for sweep trials side by side
    A.plot_frontier(data).savefig("frontier.png")

`load_run` reads the local record every stage leaves (see prefopt.runtime.tracking): `<stage>/metrics.jsonl`,
`<stage>/summary.json`, `pairs/pairs.jsonl`, `evaluate/summary.json`, `round<k>/<stage>/` for later rounds, and
`seed-<s>/[round<k>/]<stage>/` for the stages a replicated experiment ran once per seed (their rows carry `seed`).
`load_wandb` reads the same runs from the W&B API instead (online only).

Every plot takes the dict of DataFrames `load_run(s)` returns and gives a matplotlib Figure. A panel whose data is
missing (a stage not run, a run still going) says so instead of failing. Figures are built without pyplot, so
they work under any backend (Agg in scripts and tests) and leave no global state behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from matplotlib.figure import Figure

from prefopt.runtime.tracking import HEADLINE_FIGURES, flatten  # the summary's naming, shared with the runs it reads

# Stage order of the pipeline (kept here so reading a run needs no stage code)
STAGE_ORDER = ["task", "base", "sft", "reward", "generate", "score", "pairs", "dpo", "simpo", "ppo", "evaluate"]
ALIGNERS = ["dpo", "simpo", "ppo"]
EVAL_FIGURES = ["gold_score", "gold_gain", "win_rate_vs_sft_gold", "rm_score", "win_rate_vs_sft", "kl_to_sft",
                "length"]
# Figures some runs have, shown right after the figure they qualify when present: the length-controlled win rates,
# best-of-n's KL bound (its `kl_to_sft` is the estimate), the judge's win rates, the win rates against reference
# answers (evaluate.reference)
BESIDE = {"win_rate_vs_sft": ["win_rate_vs_sft_lc"], "kl_to_sft": ["kl_to_sft_bound"],
          "length": ["judge_win_rate", "judge_win_rate_lc", "win_rate_vs_ref_gold", "win_rate_vs_ref",
                     "win_rate_vs_ref_lc", "judge_win_rate_vs_ref", "judge_win_rate_vs_ref_lc"]}
SUITE_PREFIXES = ("mc/", "lm_eval/")
CURVE_COLUMNS = ["run", "round", "method", "step", "kl", "gold", "gold_se", "rm", "rm_se"]
PAIR_COLUMNS = ["prompt_id", "chosen_score", "rejected_score", "chosen_len", "rejected_len"]
# One colour per method, the same in every figure
COLORS = {"sft": "tab:gray", "dpo": "tab:blue", "simpo": "tab:orange", "ppo": "tab:green", "base": "tab:brown"}

TABLES = {
    "metrics": ["run", "stage", "round", "step", "time"],
    "summaries": ["run", "stage", "round", "wall_seconds", "path"],
    "evaluate": ["run", "round", "policy", *EVAL_FIGURES],
    "pairs": ["run", "round", *PAIR_COLUMNS],
    "timings": ["run", "stage", "round", "seconds"],
    "curves": CURVE_COLUMNS,
}


# ------------------------------------------------------------------------------------------------------ loading


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass  # a line cut short by a killed run
    except OSError:
        pass
    return rows


def _rounds(base: Path) -> list[tuple[int, Path]]:
    return [(1, base)] + sorted((int(p.name[5:]), p) for p in base.glob("round*") if p.name[5:].isdigit())


def stage_dirs(run_dir: str | Path) -> list[tuple[str, int, Path, int | None]]:
    """(stage, round, folder, seed) of every stage with a record under the run directory, in pipeline order; seed
    is the replicate's for a stage under `seed-<s>/`, None for a stage run once."""
    root = Path(run_dir)
    bases: list[tuple[int | None, Path]] = [(None, root)]
    bases += sorted((int(p.name[5:]), p) for p in root.glob("seed-*") if p.name[5:].lstrip("-").isdigit())
    found = []
    for seed, top in bases:
        for r, base in _rounds(top):
            for d in base.iterdir() if base.is_dir() else []:
                if d.is_dir() and any((d / f).exists() for f in ("summary.json", "metrics.jsonl", "config.yaml")):
                    found.append((d.name, r, d, seed))
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(found, key=lambda t: (t[1], rank.get(t[0], len(rank)), -1 if t[3] is None else t[3], t[0]))


def _frame(rows: list[dict], name: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in TABLES[name]:
        if c not in df.columns:
            df[c] = pd.Series(dtype="float64" if c not in ("run", "stage", "policy", "path", "method") else "object")
    return df[TABLES[name] + [c for c in df.columns if c not in TABLES[name]]]


def load_run(run_dir: str | Path, name: str | None = None) -> dict[str, pd.DataFrame]:
    """One run directory -> {"metrics", "summaries", "evaluate", "pairs", "timings"} DataFrames.

    metrics:   one row per logged step: run, stage, round, step, time, then every metric the stage logged.
    summaries: one row per stage: run, stage, round, wall_seconds, then its summary.json flattened ("a/b").
    evaluate:  one row per evaluated policy: run, round, policy, gold_score, rm_score, win_rate_vs_sft, ...
    pairs:     one row per preference pair: run, round, prompt_id, scores and lengths of chosen and rejected.
    timings:   stage wall time as `prefopt run` measured it (timings.json): run, stage, round, seconds.
    """
    root = Path(run_dir)
    run = name or root.name
    metrics, summaries, evaluate, pairs, curves = [], [], [], [], []
    for stage, r, d, seed in stage_dirs(root):
        for row in _read_jsonl(d / "metrics.jsonl"):
            metrics.append({"run": run, "stage": stage, "round": r, "seed": seed, **row})
        summary = _read_json(d / "summary.json")
        if summary is not None:
            flat = {k: v for k, v in flatten(summary).items() if not isinstance(v, list)}
            # `path`: a sweep trial links the stages it shares with its parent, so the same folder can appear
            # in several runs; count its time once
            summaries.append({**flat, "run": run, "stage": stage, "round": r, "seed": seed,
                              "path": str(d.resolve())})
            if stage == "evaluate":
                for policy, figs in (summary.get("policies") or {}).items():
                    evaluate.append({"run": run, "round": r, "policy": policy, "seed": seed,
                                     **{k: v for k, v in figs.items() if not isinstance(v, (dict, list))}})
                curves += [{**row, "seed": seed} for row in curve_rows(summary, run, r)]
        if stage == "pairs":
            for row in _read_jsonl(d / "pairs.jsonl"):
                pairs.append({"run": run, "round": r, "seed": seed, **{c: row.get(c) for c in PAIR_COLUMNS}})
    timings = []
    for key, seconds in (_read_json(root / "timings.json") or {}).items():
        stage, r, *rest = key.split("@")  # "dpo@1", or "dpo@1@seed-43" for a replicate's stage
        seed = int(rest[0][5:]) if rest and rest[0].startswith("seed-") else None
        timings.append({"run": run, "stage": stage, "round": int(r or 1), "seed": seed, "seconds": seconds})
    return {
        "metrics": _frame(metrics, "metrics"),
        "summaries": _frame(summaries, "summaries"),
        "evaluate": _frame(evaluate, "evaluate"),
        "pairs": _frame(pairs, "pairs"),
        "timings": _frame(timings, "timings"),
        "curves": _frame(curves, "curves"),
    }


def curve_rows(summary: dict, run: str = "", round_: int = 1) -> list[dict]:
    """The evaluate stage's over-optimisation curves as rows: one per (method, checkpoint), step 0 the baseline,
    "final" the stage's final model; best-of-n points as method `best_of_n` with step n."""
    rows = []
    for method, pts in (summary.get("curves") or {}).items():
        for p in pts:
            rows.append({"run": run, "round": round_, "method": method, **{c: p.get(c) for c in CURVE_COLUMNS[3:]}})
    for p in summary.get("best_of_n") or []:
        rows.append({"run": run, "round": round_, "method": "best_of_n", "step": p["n"],
                     **{c: p.get(c) for c in CURVE_COLUMNS[4:]}})
    return rows


def load_runs(run_dirs: Iterable[str | Path]) -> dict[str, pd.DataFrame]:
    """Several runs (e.g. a sweep's trials) stacked, told apart by the `run` column."""
    loaded = [load_run(d) for d in run_dirs]
    if not loaded:
        return {k: _frame([], k) for k in TABLES}
    return {k: pd.concat([x[k] for x in loaded if len(x[k])] or [loaded[0][k]], ignore_index=True)
            for k in TABLES}


def sweep_runs(sweep_dir: str | Path) -> tuple[pd.DataFrame, list[Path]]:
    """A `prefopt sweep` table (runs/sweeps/<name>/trials.csv) and the run directories of its trials."""
    table = pd.read_csv(Path(sweep_dir) / "trials.csv")
    return table, [Path(p) for p in table["run_dir"] if Path(p).is_dir()]


def load_wandb(project: str, group: str, entity: str | None = None) -> dict[str, pd.DataFrame]:
    """The same tables from the W&B API (needs network and `wandb login`): one W&B run per stage, grouped by
    experiment (or sweep). Gives "metrics" (each run's history) and "summaries" (each run's summary)."""
    from prefopt.runtime.tracking import wandb_mode

    if wandb_mode("auto") != "online":
        raise RuntimeError("load_wandb needs W&B online (WANDB_API_KEY or `wandb login`); "
                           "offline runs are read with load_run on their run directory")
    import wandb

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    metrics, summaries = [], []
    for r in api.runs(path, filters={"group": group}):
        cfg = r.config or {}
        stage, rnd = r.job_type or cfg.get("_stage", ""), int(cfg.get("_round", 1))
        run = (cfg.get("name") or r.group or group)
        summary = {k: v for k, v in dict(r.summary).items() if not k.startswith("_")}
        summaries.append({**flatten(summary), "run": run, "stage": stage, "round": rnd})
        for row in r.scan_history():
            metrics.append({"run": run, "stage": stage, "round": rnd, "step": row.get("_step"),
                            "time": row.get("_timestamp"),
                            **{k: v for k, v in row.items() if not k.startswith("_")}})
    return {"metrics": _frame(metrics, "metrics"), "summaries": _frame(summaries, "summaries")}


# ------------------------------------------------------------------------------------------------------ plotting


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no data:\n{what}", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _label(stage: str, r: int, run: str, many_runs: bool, many_rounds: bool) -> str:
    label = stage + (f" r{r}" if many_rounds else "")
    return f"{label} ({run})" if many_runs else label


def _curves(ax, metrics: pd.DataFrame, stages: list[str], metric: str, title: str) -> None:
    """One line per (run, stage, round) of `metric` against step."""
    ax.set_title(title)
    if metric not in metrics.columns:
        _no_data(ax, f"{metric} ({'/'.join(stages)})")
        return
    df = metrics[metrics["stage"].isin(stages) & metrics[metric].notna()]
    if df.empty:
        _no_data(ax, f"{metric} ({'/'.join(stages)})")
        return
    many_runs, many_rounds = df["run"].nunique() > 1, df["round"].nunique() > 1
    for (run, stage, r), g in df.groupby(["run", "stage", "round"], sort=False):
        g = g.sort_values("step")
        ax.plot(g["step"], g[metric], marker=".", color=COLORS.get(stage) if not many_runs else None,
                label=_label(stage, r, run, many_runs, many_rounds))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)


def plot_training_curves(data: dict[str, pd.DataFrame]) -> Figure:
    """Loss and reward margin of DPO / SimPO over steps; PPO's reward-model score and KL to the reference."""
    m = data["metrics"]
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    _curves(axes[0, 0], m, ["dpo", "simpo"], "loss", "preference loss (DPO, SimPO)")
    _curves(axes[0, 1], m, ["dpo", "simpo"], "rewards/margins", "reward margin: chosen - rejected")
    _curves(axes[1, 0], m, ["ppo"], "reward", "PPO: reward-model score of rollouts")
    _curves(axes[1, 1], m, ["ppo"], "kl", "PPO: sequence KL to the reference")
    fig.suptitle("Training curves")
    return fig


def plot_frontier(data: dict[str, pd.DataFrame]) -> Figure:
    """Gold and reward-model score against KL to the SFT policy, one point per (run, round, policy): the
    reward-KL frontier of the DPO paper's controlled experiment (Rafailov et al. 2023, Fig. 2 left)."""
    ev = data["evaluate"]
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    many_runs = ev["run"].nunique() > 1
    for ax, score in zip(axes, ["gold_score", "rm_score"]):
        ax.set_title(f"{score} vs KL to SFT")
        df = ev[ev[score].notna() & ev["kl_to_sft"].notna()] if len(ev) else ev
        if df.empty:
            _no_data(ax, f"evaluate {score} and kl_to_sft")
            continue
        for policy, g in df.groupby("policy", sort=False):
            g = g.sort_values("kl_to_sft")
            ax.scatter(g["kl_to_sft"], g[score], color=COLORS.get(policy), label=policy, s=40, zorder=3)
            if len(g) > 1 and policy != "sft":
                ax.plot(g["kl_to_sft"], g[score], color=COLORS.get(policy), alpha=0.4, lw=1)
            if many_runs and policy != "sft":
                for _, row in g.iterrows():
                    ax.annotate(str(row["run"]).rsplit("-", 1)[-1], (row["kl_to_sft"], row[score]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("KL(policy || SFT), nats per response")
        ax.set_ylabel(score)
        ax.legend(fontsize=8)
    fig.suptitle("Reward-KL frontier" + (" across runs" if many_runs else ""))
    return fig


def plot_lengths(data: dict[str, pd.DataFrame]) -> Figure:
    """The length gap between chosen and rejected responses in the pairs, the mean response length of each
    evaluated policy, and PPO's response length over training: where length exploitation shows up."""
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    ax_gap, ax_eval, ax_ppo = fig.subplots(1, 3)

    pairs = data["pairs"].dropna(subset=["chosen_len", "rejected_len"])
    ax_gap.set_title("pairs: chosen - rejected length")
    if pairs.empty:
        _no_data(ax_gap, "pairs/pairs.jsonl")
    else:
        gap = pairs["chosen_len"] - pairs["rejected_len"]
        ax_gap.hist(gap, bins=min(30, max(5, gap.nunique())), color="tab:purple", alpha=0.8)
        ax_gap.axvline(gap.mean(), color="black", ls="--",
                       label=f"mean {gap.mean():+.2f} (chosen {pairs['chosen_len'].mean():.1f}, "
                             f"rejected {pairs['rejected_len'].mean():.1f})")
        ax_gap.set_xlabel("length difference (tokens)")
        ax_gap.set_ylabel("pairs")
        ax_gap.legend(fontsize=7)

    ev = data["evaluate"].dropna(subset=["length"]) if len(data["evaluate"]) else data["evaluate"]
    ax_eval.set_title("evaluate: mean response length")
    if ev.empty:
        _no_data(ax_eval, "evaluate/summary.json")
    else:
        many = ev["run"].nunique() > 1 or ev["round"].nunique() > 1
        labels = [f"{p}\n{str(r).rsplit('-', 1)[-1]} r{k}" if many else p
                  for p, r, k in zip(ev["policy"], ev["run"], ev["round"])]
        ax_eval.bar(range(len(ev)), ev["length"], color=[COLORS.get(p, "tab:cyan") for p in ev["policy"]])
        ax_eval.set_xticks(range(len(ev)), labels, fontsize=7, rotation=90 if many else 0)
        ax_eval.set_ylabel("tokens")

    _curves(ax_ppo, data["metrics"], ["ppo"], "length", "PPO: rollout length")
    fig.suptitle("Response length")
    return fig


def plot_overoptimisation_curves(data: dict[str, pd.DataFrame]) -> Figure:
    """Gold score and reward-model score against KL to SFT along each aligner's checkpoints (error bars: one
    standard error over prompts), with best-of-n from the SFT policy: the gold-vs-proxy curves of Gao et al. 2022.
    Where the reward-model curve keeps rising and the gold curve turns down, the aligner over-optimises."""
    cv = data.get("curves")
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (key, title) in zip(axes, [("gold", "gold score"), ("rm", "reward-model score")]):
        ax.set_title(f"{title} vs KL to SFT")
        df = cv[cv[key].notna()] if cv is not None and len(cv) else None
        if df is None or df.empty:
            _no_data(ax, "evaluate curves (evaluate.checkpoints / best_of_n)")
            continue
        for (run, method), g in df.groupby(["run", "method"], sort=False):
            color = COLORS.get(method, "tab:purple" if method == "best_of_n" else None)
            style = "--" if method == "best_of_n" else "-"
            label = method if df["run"].nunique() == 1 else f"{run}/{method}"
            ax.errorbar(g["kl"], g[key], yerr=g[key + "_se"].fillna(0), color=color, ls=style, marker="o", ms=4,
                        capsize=2, label=label)
            if method == "best_of_n":
                for _, row in g.iterrows():
                    ax.annotate(f"n={row['step']}", (row["kl"], row[key]), fontsize=7, xytext=(3, -9),
                                textcoords="offset points")
        ax.set_xlabel("KL(policy || SFT), nats per response")
        ax.set_ylabel(title)
        ax.legend(fontsize=8)
    fig.suptitle("Over-optimisation: gold vs proxy along training (Gao et al. 2022)")
    return fig


def plot_overoptimisation(curves: dict, best_of_n: list[dict], path: str | Path) -> Path:
    """The evaluate stage's curves (as in its summary) drawn to `path`."""
    df = _frame(curve_rows({"curves": curves, "best_of_n": best_of_n}), "curves")
    fig = plot_overoptimisation_curves({"curves": df})
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_replicates(data: dict[str, pd.DataFrame]) -> Figure:
    """A replicated run's figures seed by seed: per policy, one point per seed (gold score, reward-model score,
    gold gain over SFT), and the mean over seeds with its across-seed standard error as a bar; the spread a
    single run's ± over prompts does not show."""
    ev = data["evaluate"]
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    seeded = ev[ev["seed"].notna()] if "seed" in ev.columns and len(ev) else ev.iloc[0:0]
    seeded = seeded[~seeded["policy"].astype(str).str.startswith("best_of_")] if len(seeded) else seeded
    for ax, key in zip(axes, ["gold_score", "rm_score", "gold_gain"]):
        ax.set_title(f"{key} per seed")
        df = seeded[seeded[key].notna()] if key in seeded.columns and len(seeded) else seeded.iloc[0:0]
        if df.empty:
            _no_data(ax, f"{key} of a replicated run (replicates: N)")
            continue
        last = df[df["round"] == df["round"].max()]
        policies = list(dict.fromkeys(last["policy"]))
        for i, policy in enumerate(policies):
            g = last[last["policy"] == policy].sort_values("seed")
            n = len(g)
            xs = [i + (j - (n - 1) / 2) * 0.08 for j in range(n)]
            ax.scatter(xs, g[key], color=COLORS.get(policy, "tab:cyan"), s=25, zorder=3)
            for x, (_, row) in zip(xs, g.iterrows()):
                ax.annotate(str(int(row["seed"])), (x, row[key]), fontsize=6, xytext=(3, 0), textcoords="offset points")
            se = g[key].std(ddof=1) / n ** 0.5 if n > 1 else 0.0
            ax.errorbar([i + 0.3], [g[key].mean()], yerr=[se], color="black", marker="_", ms=12, capsize=3)
        ax.set_xticks(range(len(policies)), policies)
        ax.set_ylabel(key)
    fig.suptitle("Replicates: one point per seed; bar: mean ± across-seed standard error")
    return fig


FIGURES = {
    "training_curves": plot_training_curves,
    "reward_kl_frontier": plot_frontier,
    "overoptimisation": plot_overoptimisation_curves,
    "lengths": plot_lengths,
    "replicates": plot_replicates,
}


def save_figures(data: dict[str, pd.DataFrame], out_dir: str | Path, dpi: int = 100) -> dict[str, Path]:
    """Every figure in FIGURES as `<out_dir>/<name>.png`; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    ev = data["evaluate"]
    replicated = "seed" in ev.columns and ev["seed"].notna().any()
    for name, plot in FIGURES.items():
        if name == "replicates" and not replicated:
            continue  # a run with one seed has no seeds to draw
        fig = plot(data)
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=dpi)
    return paths


# ------------------------------------------------------------------------------------------------------ tables


def evaluate_table(data: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The evaluate figures, one row per (run, round, policy), in the usual column order."""
    ev = data["evaluate"]
    seeded = "seed" in ev.columns and ev["seed"].notna().any()  # a replicated run: one row per seed
    cols = ["run", "round", "policy"] + (["seed"] if seeded else [])
    for c in EVAL_FIGURES:  # a figure no policy has (gold without a gold task) is no column
        if c in ev.columns and ev[c].notna().any():
            cols += [c] + [b for b in BESIDE.get(c, []) if b in ev.columns and ev[b].notna().any()]
    # the evaluation suite's figures beside them (perplexity, multiple choice, lm-eval), no standard errors twice
    cols += [c for c in ev.columns if c == "ppl" or (c.startswith(SUITE_PREFIXES) and not c.endswith("stderr"))]
    return ev[cols].reset_index(drop=True)


def stage_table(data: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per stage: wall time (as `prefopt run` measured it when it did, else the stage's own) and its figures."""
    s = data["summaries"].copy()
    keys = ["run", "stage", "round"] + (["seed"] if "seed" in s.columns and "seed" in data["timings"].columns else [])
    t = data["timings"][[*keys, "seconds"]]
    s = s.merge(t, on=keys, how="left")
    s["wall_seconds"] = s["seconds"].fillna(s["wall_seconds"])
    return s.drop(columns=["seconds"]).reset_index(drop=True)


def key_figures(row: dict[str, Any], limit: int = 8) -> dict[str, Any]:
    """The scalar figures of a stage summary worth a glance (numbers; not bookkeeping or per-policy detail): the
    stage's headline figures (its console end line's), its throughput and MFU, then the rest in summary order,
    without the per-phase throughput detail."""
    skip = {"run", "stage", "round", "wall_seconds", "path", "stage_wall_seconds", "world_size", "global_batch_size",
            "seed", "replicate_seed", "num_prompts", "samples_per_prompt", "temperature"}
    first = [*HEADLINE_FIGURES.get(row.get("stage"), []), "perf/tokens_per_s", "perf/mfu"]
    out = {}
    for k in first + [k for k in row if k not in first and not k.startswith("perf/")]:
        v = row.get(k)
        if k in skip or k.startswith(("policies/", "sampling_seeds/")) or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and pd.notna(v):
            out[k] = v
        if len(out) >= limit:
            break
    return out
