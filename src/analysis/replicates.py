"""Figures over replicates: the mean over seeds, across-seed and within-seed standard errors, paired differences
between policies with t-intervals and Holm-corrected verdicts, and the seeds a difference needs.

    agg = aggregate({42: summary_42, 43: summary_43, 44: summary_44})   # evaluate/summary.json of each seed
    print("\\n".join(table_lines(agg)))

Across runs (one policy of replicated runs that differ in a setting, paired by seed):

    python -m prefopt.analysis.replicates worst=runs/a z=runs/b --policy dpo

Each seed is one replicate of the whole comparison: its evaluate stage scored every policy on the same prompts, so
the difference between two policies is taken within a seed (paired) and its spread over seeds is the noise that a
verdict must beat. That spread holds both the training noise (seeds of the aligners) and the evaluation's sampling
noise, which is why no within-seed standard error enters the test.

- across-seed SE: sd over seeds / sqrt(n) (sd with n - 1).
- within-seed SE: the root mean square of the seeds' own standard errors over prompts: what one run reports.
- paired difference d_s = A_s - B_s: mean, sd / sqrt(n), a Student-t interval with n - 1 degrees of freedom and a
  two-sided t-test p-value.
- Holm (1979): within each figure, the comparisons (every method against the baseline and against each other) are
  one family; p-values sorted ascending p_(1) <= ... <= p_(m) are adjusted to max_{j <= i} min(1, (m - j + 1) p_(j)),
  and a verdict is given where the adjusted p is below alpha (0.05). This controls the family-wise error rate.
- seeds needed: the smallest n with t_{1-alpha/2, n-1} + t_{power, n-1} <= delta sqrt(n) / sd (the paired t-test's
  power under the shifted-t approximation), from a measured sd of paired differences.
"""

from __future__ import annotations

import math
import statistics
from itertools import combinations

# Figures summarised per policy, in table order (evaluate/summary.json's keys), and their table headings.
FIGURES = [("gold_score", "gold"), ("gold_gain", "gold - SFT"), ("win_rate_vs_sft_gold", "win (gold)"),
           ("rm_score", "RM"), ("win_rate_vs_sft", "win (RM)"), ("kl_to_sft", "KL to SFT"), ("length", "length"),
           ("win_rate_vs_ref", "ref win (RM)"), ("win_rate_vs_ref_lc", "LC ref win (RM)")]
# Figures where higher is better: the ones a verdict "A beats B" is given for.
COMPARED = ["gold_score", "rm_score", "win_rate_vs_sft_gold", "win_rate_vs_sft", "win_rate_vs_ref"]
ALPHA = 0.05


# ----------------------------------------------------------------------------------------------- Student's t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Lentz's method; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on t_cdf, to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------- tests


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: sorted ascending, the i-th (from 1) of m becomes
    max over j <= i of min(1, (m - j + 1) p_(j))."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of a_s - b_s over seeds, its standard error, 95% t-interval and two-sided p-value (n - 1 df)."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = statistics.fmean(d)
    out = {"n": n, "diff": mean, "values": d, "sd": None, "se": None, "ci": None, "p": None}
    if n < 2:
        return out  # one seed: no spread to test against
    sd = statistics.stdev(d)
    se = sd / math.sqrt(n)
    if se == 0.0:  # every seed gave the same difference: no noise to weigh it against
        p = 1.0 if mean == 0.0 else 0.0
        half = 0.0
    else:
        p = 2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1))
        half = t_quantile(1.0 - ALPHA / 2.0, n - 1) * se
    out.update(sd=sd, se=se, ci=[mean - half, mean + half], p=p)
    return out


def seeds_needed(sd: float, delta: float = 0.05, alpha: float = ALPHA, power: float = 0.8,
                 most: int = 1000) -> int | None:
    """Seeds a paired t-test needs to detect a true difference `delta` with the given power at two-sided `alpha`,
    when paired differences have standard deviation `sd`: the smallest n >= 2 with
    t_{1-alpha/2, n-1} + t_{power, n-1} <= delta * sqrt(n) / sd. None beyond `most`."""
    if sd <= 0:
        return 2
    for n in range(2, most + 1):
        if t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1) <= delta * math.sqrt(n) / sd:
            return n
    return None


# ----------------------------------------------------------------------------------------------- aggregation


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def methods(summary: dict) -> list[str]:
    """The policies compared: the evaluated policies, the baseline first, without best-of-n rows."""
    names = [p for p in summary.get("policies", {}) if not p.startswith("best_of_")]
    base = summary.get("baseline")
    return ([base] if base in names else []) + [p for p in names if p != base]


def aggregate(summaries: dict[int, dict], delta: float = 0.05) -> dict:
    """Per-seed evaluate summaries ({seed: summary.json}) -> the replicate figures (see the module docstring)."""
    seeds = sorted(summaries)
    first = summaries[seeds[0]]
    names = list(dict.fromkeys(p for s in seeds for p in summaries[s].get("policies", {})))
    policies: dict[str, dict] = {}
    for name in names:
        figs = {}
        for key, _ in FIGURES:
            per_seed = {s: summaries[s]["policies"][name].get(key) for s in seeds
                        if name in summaries[s].get("policies", {})}
            vals = [v for v in per_seed.values() if _num(v)]
            if not vals:
                continue
            ses = [summaries[s]["policies"][name].get(key + "_se") for s in per_seed]
            ses = [x for x in ses if _num(x)]
            sd = statistics.stdev(vals) if len(vals) > 1 else None
            figs[key] = {"mean": statistics.fmean(vals), "sd_seeds": sd,
                         "se_seeds": sd / math.sqrt(len(vals)) if sd is not None else None,
                         "se_within": math.sqrt(statistics.fmean(x * x for x in ses)) if ses else None,
                         "per_seed": {str(s): v for s, v in per_seed.items()}}
        policies[name] = figs
    compared = methods(first)
    comparisons = []
    for key in COMPARED:
        family = []
        for a, b in combinations(compared, 2):
            if a == first.get("baseline"):
                a, b = b, a  # "method - baseline"
            both = [s for s in seeds if all(_num(summaries[s].get("policies", {}).get(p, {}).get(key)) for p in (a, b))]
            if not both:
                continue
            r = paired_difference([summaries[s]["policies"][a][key] for s in both],
                                  [summaries[s]["policies"][b][key] for s in both])
            family.append({"figure": key, "a": a, "b": b, "seeds": both, **r})
        tested = [c for c in family if c["p"] is not None]
        for c, adj in zip(tested, holm([c["p"] for c in tested])):
            c["p_holm"] = adj
            c["family_size"] = len(tested)
            c["verdict"] = (f"{c['a']} better" if c["diff"] > 0 else f"{c['b']} better") if adj < ALPHA else \
                "not resolved"
        for c in family:
            c.setdefault("p_holm", None)
            c.setdefault("verdict", "one seed: no test")
        comparisons += family
    return {"seeds": seeds, "num_prompts": first.get("num_prompts"), "split": first.get("split"),
            "samples_per_prompt": first.get("samples_per_prompt"), "baseline": first.get("baseline"),
            "policies": policies, "comparisons": comparisons, "power": power_summary(comparisons, delta)}


def power_summary(comparisons: list[dict], delta: float = 0.05) -> dict:
    """Per compared figure: the root-mean-square over its comparisons of the across-seed sd of paired differences,
    and the seeds needed for `delta` at 80% power, two-sided 0.05 (and at 0.05 / m, Holm's strictest step)."""
    out = {}
    for key in COMPARED:
        sds = [c["sd"] for c in comparisons if c["figure"] == key and c["sd"] is not None]
        if not sds:
            continue
        sd = math.sqrt(statistics.fmean(x * x for x in sds))
        m = len(sds)
        out[key] = {"delta": delta, "sd_paired": sd, "sd_paired_max": max(sds), "comparisons": m,
                    "seeds_needed": seeds_needed(sd, delta), "seeds_needed_holm": seeds_needed(sd, delta, ALPHA / m),
                    "seeds_needed_worst": seeds_needed(max(sds), delta)}
    return out


# ----------------------------------------------------------------------------------------------- the table


def _cell(f: dict | None) -> str:
    if not f:
        return "-"
    if f["se_seeds"] is None:
        return f"{f['mean']:.3f}"
    within = f" [{f['se_within']:.3f}]" if f["se_within"] is not None else ""
    return f"{f['mean']:.3f} ± {f['se_seeds']:.3f}{within}"


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return [out[0], "-" * len(out[0]), *out[1:]]


def table_lines(agg: dict) -> list[str]:
    """The replicate table as printed by `prefopt run` and written to replicates.md."""
    seeds = agg["seeds"]
    cols = [(k, h) for k, h in FIGURES if any(k in figs for figs in agg["policies"].values())]
    lines = [f"Figures over {len(seeds)} seeds ({', '.join(map(str, seeds))}) on {agg.get('num_prompts', '?')} "
             f"{agg.get('split') or ''} prompts x {agg.get('samples_per_prompt', '?')} samples: mean over seeds "
             "± across-seed standard error [within-seed standard error over prompts, what one run reports]:"]
    rows = [["policy"] + [h for _, h in cols]]
    rows += [[name] + [_cell(figs.get(k)) for k, _ in cols] for name, figs in agg["policies"].items()]
    lines += _columns(rows)
    if not agg["comparisons"]:
        return lines
    heading = dict(FIGURES)
    m = max((c.get("family_size") or 0) for c in agg["comparisons"])
    lines += ["", f"Paired differences over seeds (mean, 95% t-interval with n - 1 df; p two-sided; Holm-adjusted "
                  f"over the {m} comparisons of each figure; a verdict where the adjusted p < {ALPHA:g}):"]
    rows = [["figure", "comparison", "difference", "95% interval", "p", "p (Holm)", "verdict"]]
    for c in agg["comparisons"]:
        ci = f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" if c["ci"] else "-"
        rows.append([heading[c["figure"]], f"{c['a']} - {c['b']}", f"{c['diff']:+.3f}", ci,
                     "-" if c["p"] is None else f"{c['p']:.3f}",
                     "-" if c["p_holm"] is None else f"{c['p_holm']:.3f}", c["verdict"]])
    lines += _columns(rows)
    for key, p in agg.get("power", {}).items():
        if key not in ("gold_score", "rm_score"):
            continue  # the win rates' are in replicates.json
        need = lambda n: f"{n}" if n is not None else f"more than 1000"  # noqa: E731
        lines.append(f"{heading[key]}: sd of paired differences over seeds {p['sd_paired']:.3f} (largest "
                     f"{p['sd_paired_max']:.3f}); seeds for a {p['delta']:g} difference at 80% power: "
                     f"{need(p['seeds_needed'])} (two-sided {ALPHA:g}), {need(p['seeds_needed_holm'])} at Holm's "
                     f"strictest step ({ALPHA:g}/{p['comparisons']}), {need(p['seeds_needed_worst'])} at the "
                     "largest sd")
    return lines


# ----------------------------------------------------------------------------------------------- across runs


def seed_summaries(run_dir, round_: int | None = None) -> dict[int, dict]:
    """{seed: evaluate/summary.json} of a replicated run directory (`seed-<s>/[round<k>/]evaluate/`), the last
    round unless `round_` says which."""
    import json
    from pathlib import Path

    out = {}
    for d in sorted(Path(run_dir).glob("seed-*")):
        if not d.name[5:].lstrip("-").isdigit():
            continue
        rounds = sorted((int(p.name[5:]), p) for p in d.glob("round*") if p.name[5:].isdigit())
        base = dict(rounds).get(round_, d) if round_ else (rounds[-1][1] if rounds else d)
        path = base / "evaluate" / "summary.json"
        if path.exists():
            out[int(d.name[5:])] = json.loads(path.read_text())
    return out


def across_runs(runs: dict[str, dict[int, dict]], policy: str, baseline: str | None = None) -> dict:
    """One policy of several replicated runs (settings A, B, ...) compared seed by seed: {label: {seed: summary}}
    -> `aggregate` over the seeds every run has, the policies named by the run labels, and the first run's
    baseline (SFT) beside them. Paired by seed: each seed's evaluation samples are drawn alike in every run."""
    labels = list(runs)
    seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not seeds:
        raise ValueError(f"the runs {labels} share no seed with a finished evaluate stage")
    first = runs[labels[0]]
    base = baseline or first[seeds[0]].get("baseline")
    merged = {}
    for s in seeds:
        pol = {base: first[s]["policies"][base]} if base else {}
        for label in labels:
            if policy not in runs[label][s].get("policies", {}):
                raise ValueError(f"run {label}, seed {s}: no policy {policy!r} in its evaluate summary")
            pol[label] = runs[label][s]["policies"][policy]
        merged[s] = {**first[s], "policies": pol, "baseline": base}
    return aggregate(merged)


def main(argv: list[str] | None = None) -> int:
    """`python -m prefopt.analysis.replicates RUN_A RUN_B [...] --policy dpo`: one policy across replicated runs."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m prefopt.analysis.replicates",
                                description="Compare one policy across replicated runs (settings), paired by seed.")
    p.add_argument("runs", nargs="+", help="replicated run directories (runs/<name>), or LABEL=DIR")
    p.add_argument("--policy", default="dpo", help="the evaluated policy to compare (default dpo)")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, _, path = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        runs[label] = seed_summaries(path)
    print("\n".join(table_lines(across_runs(runs, args.policy))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
