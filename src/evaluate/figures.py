"""The evaluate stage's figures of a sample set: means over prompts with standard errors, win rates and the
length-controlled win rate against the baseline, KL to it, the judge's figures, and points of the curves."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefopt.evaluate import metrics as M
from prefopt.evaluate.samples import count, head, lengths, nest, subset, token_ids


def figures_of(name: str, s: dict, gold, rm, own, ref, base_gold, base_rm, base_s: dict | None = None,
               is_baseline: bool = False) -> dict:
    """Every figure of one sample set, each a mean over prompts with its standard error (`*_se`); gains and win
    rates are paired with the baseline's samples of the same prompts (`base_s`: those samples, for the
    length-controlled win rate and, unless the set is the baseline's own, the identical-pair rate)."""
    f: dict = {}

    def put(key, values):
        f[key], f[key + "_se"] = M.mean_se(values)

    if gold is not None:
        put("gold_score", M.per_prompt_means(gold))
        if base_gold is not None:
            put("gold_gain", [a - b for a, b in zip(M.per_prompt_means(gold), M.per_prompt_means(base_gold))])
            put("win_rate_vs_sft_gold", M.per_prompt_win_rates(gold, base_gold))
    if rm is not None:
        put("rm_score", M.per_prompt_means(rm))
        if base_rm is not None:
            put("win_rate_vs_sft", M.per_prompt_win_rates(rm, base_rm))
            if base_s is not None:
                lc = M.length_controlled_win_rate(*M.rm_preference_pairs(rm, base_rm, lengths(s), lengths(base_s)))
                f["win_rate_vs_sft_lc"], f["win_rate_vs_sft_lc_se"] = lc["win_rate"], lc["se"]
                f["rm_length_coef"] = lc["length_coef"]
                if lc.get("why"):  # no LC figure: why, for the stage's warnings
                    f["win_rate_vs_sft_lc_why"] = lc["why"]
    if base_s is not None and not is_baseline:
        put("identical_pairs", [M.prompt_identical_rate(a, b) for a, b in zip(token_ids(s), token_ids(base_s))])
    if own is not None and ref is not None:
        put("kl_to_sft", M.per_prompt_means(nest([a - b for a, b in zip(own, ref)], s)))
    comps = [c for cs in s["completions"] for c in cs]
    f["length"] = M.mean_length([len(c.token_ids) for c in comps])
    f["finished"] = sum(c.finished for c in comps) / len(comps)
    if own is not None:
        f["logp"] = sum(own) / len(own)
    return f


def judge_figures(judged: dict, s: dict, base_s: dict, k: int) -> dict:
    """The judge's figures for one policy on its first k prompts (sample 0 of each side): win rate with its error
    over prompts, the length-controlled win rate, order disagreement, and how many judged pairs were one response."""
    p = judged["p_first_better"]
    d = [len(a[0].token_ids) - len(b[0].token_ids) for a, b in zip(s["completions"][:k], base_s["completions"][:k])]
    lc = M.length_controlled_win_rate(p, d, clusters=range(len(p)))
    win, se = M.mean_se(p)
    same = [float(a[0].token_ids == b[0].token_ids) for a, b in zip(s["completions"][:k], base_s["completions"][:k])]
    out = {"judge_win_rate": win, "judge_win_rate_se": se, "judge_win_rate_lc": lc["win_rate"],
           "judge_win_rate_lc_se": lc["se"], "judge_length_coef": lc["length_coef"],
           "judge_order_disagreement": judged["disagreement"], "judge_identical_pairs": sum(same) / len(same)}
    if lc.get("why"):
        out["judge_win_rate_lc_why"] = lc["why"]
    return out


def fig_subset(s: dict, gold, rm, k: int) -> dict:
    out = {}
    if gold is not None:
        out["gold_score"], out["gold_score_se"] = M.mean_se(M.per_prompt_means(gold[:k]))
    if rm is not None:
        out["rm_score"], out["rm_score_se"] = M.mean_se(M.per_prompt_means(rm[:k]))
    return out


def curve_point(step, f: dict, kl: float | None = None) -> dict:
    return {"step": step, "kl": f.get("kl_to_sft") if kl is None else kl, "kl_se": f.get("kl_to_sft_se"),
            "gold": f.get("gold_score"), "gold_se": f.get("gold_score_se"),
            "rm": f.get("rm_score"), "rm_se": f.get("rm_score_se")}


def best_of_n_points(rm: list[list[float]], gold: list[list[float]] | None, ids: list[list[tuple]],
                     base_gold: list[list[float]] | None, ns) -> list[dict]:
    """One point per n in `ns`: the reward model's best of the first n of each prompt's samples (`rm`, `gold` and
    `ids` of the max(n) baseline samples per prompt), its gold and RM score, the gold gain over the baseline's mean
    (`base_gold`), and its KL from the samples of each prompt, ties counted, with the analytical bound beside it."""
    bon = []
    for n in sorted(set(ns)):
        pick = M.best_of_n(rm, n)
        g = [[gold[i][j]] for i, j in enumerate(pick)] if gold is not None else None
        r = [[rm[i][j]] for i, j in enumerate(pick)]
        kl, kl_se = M.mean_se(M.best_of_n_kl_estimate(ids, rm, n))
        point = {"n": n, "kl": kl, "kl_se": kl_se, "kl_bound": M.best_of_n_kl_bound(n)}
        for key, vals in (("gold", g), ("rm", r)):
            if vals is not None:
                point[key], point[key + "_se"] = M.mean_se(M.per_prompt_means(vals))
        if g is not None and base_gold is not None:
            point["gold_gain"], point["gold_gain_se"] = M.mean_se(
                [a[0] - b for a, b in zip(g, M.per_prompt_means(base_gold))])
        bon.append(point)
    return bon


def best_of_n_rows(bon: list[dict]) -> dict[str, dict]:
    """The table's `best_of_<n>` rows of `best_of_n_points`."""
    return {f"best_of_{p['n']}": {"gold_score": p.get("gold"), "gold_score_se": p.get("gold_se"),
                                  "rm_score": p["rm"], "rm_score_se": p["rm_se"], "kl_to_sft": p["kl"],
                                  "kl_to_sft_se": p["kl_se"], "kl_to_sft_bound": p["kl_bound"],
                                  "gold_gain": p.get("gold_gain"), "gold_gain_se": p.get("gold_gain_se")}
            for p in bon}


@dataclass
class Draws:
    """Every sample set (`sets`: name -> path, rows, n, and for a checkpoint its method and step) with its samples
    and, by set name, the figures of each sample: `gold` and `rm` nested per prompt, `own` (the set's log-prob of
    its samples) and `ref` (the baseline's) flat, prompt-major. `base` names the baseline policy, or None."""

    sets: dict[str, dict]
    samples: dict[str, dict]
    base: str | None
    own: dict = field(default_factory=dict)
    ref: dict = field(default_factory=dict)
    rm: dict = field(default_factory=dict)
    gold: dict = field(default_factory=dict)

    def figures(self, name: str, k: int | None = None) -> dict:
        """`figures_of` set `name` against the baseline's samples of its first k prompts (default: all the set's)."""
        base = self.base
        k = k or len(self.sets[name]["rows"])
        base_s = subset(self.samples[base], k) if base is not None else None
        return figures_of(name, self.samples[name], self.gold.get(name), self.rm.get(name), self.own.get(name),
                          self.ref.get(name), self.gold[base][:k] if base in self.gold else None,
                          self.rm[base][:k] if base in self.rm else None, base_s, is_baseline=name == base)

    def figures_on_first(self, name: str, k: int) -> dict:
        """`figures_of` policy `name` on its first k prompts only (a curve's "final" point, beside its checkpoints)."""
        s, base, n = self.samples[name], self.base, count(self.samples[name], k)
        return figures_of(name, subset(s, k), head(self.gold.get(name), k), head(self.rm.get(name), k),
                          self.own[name][:n], self.ref[name][:n] if name in self.ref else None,
                          head(self.gold.get(base), k), head(self.rm.get(base), k), subset(self.samples[base], k))
