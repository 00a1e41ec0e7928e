"""Pair strategies: scores of one prompt's candidates -> (chosen index, rejected index) pairs. Pure functions.

    best_vs_worst   the highest-scored candidate against the lowest (SimPO's on-policy recipe, Meng et al. 2024,
                    Sec. 3 / App. B: 5 samples, the ArmoRM-best as chosen and the worst as rejected)
    best_vs_random  the highest against up to k others drawn at random among those more than `margin` below it
    all_pairs       every (i, j) with s_i - s_j > margin, largest gaps first, at most k
    best_vs_z       the highest against the candidate scored nearest mu + z sigma of the prompt's scores (z = -2:
                    Xiao et al. 2025, "Finding the Sweet Spot: Preference Data Construction for Scaling Preference
                    Optimization", arXiv 2502.16825, who found the rejected answer at mu - 2 sigma better than the
                    minimum once many candidates are sampled; with few candidates the two mostly coincide)

A pair is kept only when s_chosen - s_rejected > margin (margin 0 drops exact ties). Candidates with the same
text are one candidate (the first index keeps it): identical texts give a pair with nothing to learn.
"""

from __future__ import annotations

import random
import statistics

STRATEGIES = ("best_vs_worst", "best_vs_random", "all_pairs", "best_vs_z")


def distinct(scores: list[float], texts: list[str] | None = None) -> list[int]:
    """Indices of the candidates to pair: the first of each distinct text (all indices without texts)."""
    if texts is None:
        return list(range(len(scores)))
    seen, out = set(), []
    for i, t in enumerate(texts):
        if t not in seen:
            seen.add(t)
            out.append(i)
    return out


def drop_reason(scores: list[float], margin: float, texts: list[str] | None = None) -> str | None:
    """Why a prompt can give no pair, or None when it can: fewer_than_2_candidates, all_tied, below_margin."""
    idx = distinct(scores, texts)
    if len(idx) < 2:
        return "fewer_than_2_candidates"
    vals = [scores[i] for i in idx]
    if max(vals) == min(vals):
        return "all_tied"
    if max(vals) - min(vals) <= margin:
        return "below_margin"
    return None


def _best(scores: list[float], texts: list[str] | None, k: int) -> tuple[list[int], int] | None:
    """The distinct candidates and the best of them (the first index on a tie, so the choice is deterministic), or
    None when the prompt can give no pair (fewer than two distinct candidates, or k < 1)."""
    idx = distinct(scores, texts)
    if len(idx) < 2 or k < 1:
        return None
    return idx, max(idx, key=lambda i: (scores[i], -i))


def best_vs_worst(scores: list[float], margin: float = 0.0, k: int = 1, texts: list[str] | None = None,
                  rng: random.Random | None = None) -> list[tuple[int, int]]:
    """[(argmax, argmin)] when their gap exceeds `margin`, else []. One pair per prompt whatever k (k >= 1)."""
    if (found := _best(scores, texts, k)) is None:
        return []
    idx, best = found
    worst = min(idx, key=lambda i: (scores[i], i))
    return [(best, worst)] if scores[best] - scores[worst] > margin else []


def best_vs_random(scores: list[float], margin: float = 0.0, k: int = 1, texts: list[str] | None = None,
                   rng: random.Random | None = None) -> list[tuple[int, int]]:
    """The best against up to k distinct others drawn (with `rng`) among those scored more than `margin` below."""
    if (found := _best(scores, texts, k)) is None:
        return []
    idx, best = found
    rng = rng or random.Random(0)
    eligible = [j for j in idx if scores[best] - scores[j] > margin]
    return [(best, j) for j in rng.sample(eligible, min(k, len(eligible)))]


def all_pairs(scores: list[float], margin: float = 0.0, k: int = 1, texts: list[str] | None = None,
              rng: random.Random | None = None) -> list[tuple[int, int]]:
    """Every (i, j) with s_i - s_j > margin; the k with the largest gaps (ties by index)."""
    idx = distinct(scores, texts)
    pairs = [(i, j) for i in idx for j in idx if scores[i] - scores[j] > margin]
    pairs.sort(key=lambda p: (-(scores[p[0]] - scores[p[1]]), p))
    return pairs[:max(k, 0)]


def best_vs_z(scores: list[float], margin: float = 0.0, k: int = 1, texts: list[str] | None = None,
              rng: random.Random | None = None, z: float = -2.0) -> list[tuple[int, int]]:
    """[(argmax, j)] with j the other distinct candidate whose score is nearest mu + z * sigma, when the gap exceeds
    `margin`. mu and sigma (population, n in the denominator) are over all of the prompt's candidates, repeats
    included: they are the policy's reward distribution, as the paper's. A tie in distance goes to the lower score,
    then the lower index. One pair per prompt whatever k."""
    if (found := _best(scores, texts, k)) is None:
        return []
    idx, best = found
    target = statistics.fmean(scores) + z * statistics.pstdev(scores)
    rejected = min((j for j in idx if j != best), key=lambda j: (abs(scores[j] - target), scores[j], j))
    return [(best, rejected)] if scores[best] - scores[rejected] > margin else []


def select_pairs(strategy: str, scores: list[float], margin: float = 0.0, k: int = 1,
                 texts: list[str] | None = None, rng: random.Random | None = None,
                 z: float = -2.0) -> list[tuple[int, int]]:
    fns = {"best_vs_worst": best_vs_worst, "best_vs_random": best_vs_random, "all_pairs": all_pairs}
    if strategy == "best_vs_z":
        return best_vs_z(scores, margin=margin, k=k, texts=texts, rng=rng, z=z)
    if strategy not in fns:
        raise ValueError(f"unknown pair strategy {strategy!r}; strategies are {', '.join(STRATEGIES)}")
    return fns[strategy](scores, margin=margin, k=k, texts=texts, rng=rng)


def gold_audit(rows: list[dict], pairs: list[dict], gold) -> dict:
    """How far the reward model's choices agree with a task's gold scorer (only when the task has one).

    rm_pairwise_accuracy: over every two candidates of a prompt whose gold scores differ, how often the reward
    model orders them as gold does (the reward model's accuracy *on the policy's own samples*, which held-out
    preference accuracy does not show). chosen_better: fraction of pairs whose chosen answer has the higher gold
    score (ties count 1/2). best_is_gold_best: when a prompt's candidates differ in gold, how often the reward
    model's top candidate is a gold-best one."""
    from prefopt.gold import example

    right = total = top = tops = 0
    examples = {row["prompt_id"]: example(row) for row in rows}
    for row in rows:
        g = [gold(examples[row["prompt_id"]], c) for c in row["candidates"]]
        s = row["scores"]
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                if g[i] != g[j]:
                    total += 1
                    right += (s[i] > s[j]) == (g[i] > g[j]) and s[i] != s[j]
        if len(set(g)) > 1:
            tops += 1
            top += g[max(range(len(s)), key=s.__getitem__)] == max(g)
    better = [1.0 if gc > gr else 0.5 if gc == gr else 0.0
              for gc, gr in ((gold(examples[p["prompt_id"]], p["chosen"]), gold(examples[p["prompt_id"]], p["rejected"]))
                             for p in pairs)]
    return {
        "gold/rm_pairwise_accuracy": right / total if total else None,
        "gold/chosen_better": sum(better) / len(better) if better else None,
        "gold/best_is_gold_best": top / tops if tops else None,
    }
