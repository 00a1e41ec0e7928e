"""The evaluate stage's table (markdown, one row per policy, "mean ± standard error") and figure."""

from __future__ import annotations

from pathlib import Path

# (figure, column head); a figure with a `<figure>_se` beside it is printed as "mean ± standard error"
COLUMNS = [("gold_score", "gold"), ("gold_gain", "gold − SFT"), ("win_rate_vs_sft_gold", "win vs SFT (gold)"),
           ("rm_score", "RM"), ("win_rate_vs_sft", "win vs SFT (RM)"), ("win_rate_vs_sft_lc", "LC win vs SFT (RM)"),
           ("kl_to_sft", "KL to SFT"), ("kl_to_sft_bound", "KL bound (best-of-n)"), ("length", "length"),
           ("judge_win_rate", "judge win"), ("judge_win_rate_lc", "LC judge win"),
           ("judge_order_disagreement", "judge order disagree"),
           ("win_rate_vs_ref_gold", "win vs ref (gold)"), ("win_rate_vs_ref", "win vs ref (RM)"),
           ("win_rate_vs_ref_lc", "LC win vs ref (RM)"), ("judge_win_rate_vs_ref", "judge win vs ref"),
           ("judge_win_rate_vs_ref_lc", "LC judge win vs ref")]


def fmt(v, se=None) -> str:
    if v is None:
        return "–"
    if not isinstance(v, float):
        return str(v)
    if not se:
        return f"{v:.3f}"
    return f"{v:.3f} ± {se:.3f}" if se >= 5e-4 else f"{v:.3f} ± <0.001"  # a tiny error is not printed as ± 0.000


def table(policies: dict[str, dict], split: str = "", n_prompts: int = 0) -> str:
    """A markdown table, one row per policy, "mean ± standard error over prompts"; columns empty for every policy
    are left out. The first line says which prompts the figures are on."""
    cols = [(k, h) for k, h in COLUMNS if any(p.get(k) is not None for p in policies.values())]
    head = f"Figures on {n_prompts} {split} prompts (± one standard error over prompts).\n\n" if split else ""
    lines = ["| policy | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, p in policies.items():
        lines.append(f"| {name} | " + " | ".join(fmt(p.get(k), p.get(k + "_se")) for k, _ in cols) + " |")
    return head + "\n".join(lines) + "\n"


def plot(policies: dict[str, dict], path: Path) -> bool:
    """Bars of the gold (else RM) score per policy, and that score against the KL to the baseline."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to pick

    key = "gold_score" if any(p.get("gold_score") is not None for p in policies.values()) else "rm_score"
    names = [n for n, p in policies.items() if p.get(key) is not None]
    if not names:
        return False
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    bars = ax1.bar(names, [policies[n][key] for n in names], color="tab:blue")
    ax1.bar_label(bars, fmt="%.3f")
    if key == "gold_score":  # gold scores lie in [0, 1]: a fixed axis makes runs comparable at a glance
        ax1.set_ylim(0, 1.1)
    ax1.set_ylabel(key.replace("_", " "))
    ax1.set_title(f"{key.replace('_', ' ')} per policy")
    kl = [n for n in names if policies[n].get("kl_to_sft") is not None]
    ax2.scatter([policies[n]["kl_to_sft"] for n in kl], [policies[n][key] for n in kl], color="tab:orange")
    for n in kl:
        ax2.annotate(n, (policies[n]["kl_to_sft"], policies[n][key]), textcoords="offset points", xytext=(4, 4))
    ax2.set_xlabel("KL to baseline (nats, Monte-Carlo estimate)")
    ax2.set_ylabel(key.replace("_", " "))
    ax2.set_title(f"{key.replace('_', ' ')} vs KL")
    fig.savefig(path, dpi=120)
    return True
