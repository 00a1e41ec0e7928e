"""The `pairs` stage: scored candidates -> chosen/rejected pairs with their provenance.

    prefopt pairs experiments/quickstart.yaml --pairs.strategy=all_pairs --pairs.margin=0.1

Reads `generate/shard-*.jsonl` and `score/shard-*.jsonl` (joined on prompt_id), applies the strategy
(strategies.py), and writes:
  pairs.jsonl         one row per pair: prompt, chosen, rejected, both candidate indices, both scores, both
                      lengths, generator and reward-model weight hashes, sampling seed
  dataset/            the same rows as a HF dataset (datasets.load_from_disk)
  pairs_summary.png   margin histogram and chosen-minus-rejected length gap (length exploitation shows here first)
The DPO / SimPO stages read pairs.jsonl with load_preferences (format `preference`; prompts are rendered text).
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from prefopt.data.counts import note
from prefopt.data.errors import DataError
from prefopt.pairs.strategies import drop_reason, gold_audit, select_pairs
from prefopt.io import iter_jsonl, write_jsonl


def load_scored(gen_dir: str | Path, score_dir: str | Path) -> tuple[list[dict], int]:
    """Generation rows with their `scores` and `reward_model` attached; and how many rows had no scores."""
    scores = {}
    for shard in sorted(Path(score_dir).glob("shard-*.jsonl")):
        for n, row in enumerate(iter_jsonl(shard), start=1):
            bad = [i for i, s in enumerate(row["scores"]) if not isinstance(s, (int, float)) or not math.isfinite(s)]
            if bad:  # NaN/inf from a broken reward model would otherwise surface as a numpy error mid-write
                raise DataError(shard, n, f"scores[{bad[0]}]", f"not a finite score ({row['scores'][bad[0]]!r}); "
                                "check the reward model, then rerun the score stage")
            scores[row["prompt_id"]] = row
    shards = sorted(Path(gen_dir).glob("shard-*.jsonl"))
    if not shards:
        raise FileNotFoundError(f"no candidate shards (shard-*.jsonl) in {gen_dir}: run the generate stage first")
    rows, missing = [], 0
    for shard in shards:
        for row in iter_jsonl(shard):
            s = scores.get(row["prompt_id"])
            if s is None or len(s["scores"]) != len(row["candidates"]):
                missing += 1
                continue
            rows.append({**row, "scores": s["scores"], "reward_model": s["reward_model"]})
    return rows, missing


def length_counter(generator_path: str | None):
    """(len function, unit): tokens with the generator's tokenizer when its folder is at hand, else characters."""
    if generator_path and Path(generator_path).is_dir():
        try:
            from prefopt.models.loading import load_tokenizer

            tok = load_tokenizer(generator_path)
            return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), "tokens"
        except (OSError, ValueError):
            pass
    return len, "characters"


def make_pairs(row: dict, strategy: str, margin: float, k: int, rng: random.Random, length,
               z: float = -2.0) -> list[dict]:
    """The pair rows of one scored prompt (`z`: best_vs_z's position of the rejected answer)."""
    cands, scores = row["candidates"], row["scores"]
    seed = row.get("seed")
    per_candidate_seed = isinstance(seed, list) and len(seed) == len(cands)
    out = []
    for c, r in select_pairs(strategy, scores, margin, k, texts=cands, rng=rng, z=z):
        pair = {
            "prompt_id": row["prompt_id"],
            "prompt": row["prompt"],
            "chosen": cands[c],
            "rejected": cands[r],
            "chosen_index": c,
            "rejected_index": r,
            "chosen_score": scores[c],
            "rejected_score": scores[r],
            "chosen_len": length(cands[c]),
            "rejected_len": length(cands[r]),
            "generator_sha256": (row.get("generator") or {}).get("sha256"),
            "reward_model_sha256": row["reward_model"]["sha256"],
            # one sample per seed (SimPO recipe): the seed that drew the chosen one, and the rejected one's beside it
            "seed": seed[c] if per_candidate_seed else seed,
        }
        if per_candidate_seed:
            pair["rejected_seed"] = seed[r]
        out.append(pair)
    return out


def histogram(values: list[float], bins: int = 10) -> dict:
    import numpy as np

    if not values:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def plot(margins: list[float], gaps: list[float], unit: str, path: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to pick

    fig = Figure(figsize=(10, 3.5), layout="constrained")
    a, b = fig.subplots(1, 2)
    a.hist(margins, bins=20, color="tab:blue")
    a.set(title=f"score margin (n={len(margins)})", xlabel="chosen - rejected score", ylabel="pairs")
    b.hist(gaps, bins=20, color="tab:orange")
    b.axvline(0, color="k", lw=0.8)
    mean_gap = statistics.fmean(gaps) if gaps else 0.0
    b.set(title=f"length gap (mean {mean_gap:+.2f} {unit})", xlabel=f"chosen - rejected length ({unit})")
    fig.savefig(path, dpi=100)
    return path


def run(ctx) -> dict:
    cfg = ctx.section
    rows, missing = load_scored(ctx.resolve(cfg.generate, model=False), ctx.resolve(cfg.score, model=False))
    gen_path = next((r.get("generator", {}).get("path") for r in rows if r.get("generator")), None)
    length, unit = length_counter(gen_path)

    pairs, dropped = [], Counter()
    scored = {row["prompt_id"]: row["scores"] for row in rows}
    if missing:
        dropped["missing_scores"] = missing
    for row in tqdm(rows, desc="pairs", unit="prompt", disable=not ctx.is_main):
        # a per-prompt generator: the same prompt gets the same pairs whatever order the shards are read in
        rng = random.Random(f"{ctx.seed}-{cfg.seed}-{row['prompt_id']}")
        new = make_pairs(row, cfg.strategy, cfg.margin, cfg.max_pairs_per_prompt, rng, length, cfg.rejected_z)
        if not new:
            dropped[drop_reason(row["scores"], cfg.margin, row["candidates"]) or "no_pair"] += 1
        pairs += new

    for reason, n in dropped.items():
        note(f"prompts without a pair ({reason})", n)
    write_jsonl(ctx.dir / "pairs.jsonl", pairs)
    save_dataset(pairs, ctx.dir / "dataset")
    margins = [p["chosen_score"] - p["rejected_score"] for p in pairs]
    gaps = [p["chosen_len"] - p["rejected_len"] for p in pairs]
    png = plot(margins, gaps, unit, ctx.dir / "pairs_summary.png")
    summary = {
        "strategy": cfg.strategy,
        "margin": cfg.margin,
        "max_pairs_per_prompt": cfg.max_pairs_per_prompt,
        **({"rejected_z": cfg.rejected_z} if cfg.strategy == "best_vs_z" else {}),
        "rejected_is_worst": (statistics.fmean(p["rejected_score"] == min(scored[p["prompt_id"]]) for p in pairs)
                              if pairs else None),
        "prompts": len(rows) + missing,
        "prompts_with_pairs": len({p["prompt_id"] for p in pairs}),
        "pairs": len(pairs),
        "dropped": dict(dropped),
        "length_unit": unit,
        "length/chosen": statistics.fmean(p["chosen_len"] for p in pairs) if pairs else None,
        "length/rejected": statistics.fmean(p["rejected_len"] for p in pairs) if pairs else None,
        "length/gap_mean": statistics.fmean(gaps) if gaps else None,
        "margin/mean": statistics.fmean(margins) if margins else None,
        "margin/histogram": histogram(margins),
        "length/gap_histogram": histogram(gaps),
        "plot": png.name,
    }
    from prefopt.gold import TaskError, get_task, has_gold

    if has_gold(ctx.cfg.task):  # a task with a gold scorer: audit the reward model's choices on the policy's samples
        try:
            summary.update(gold_audit(rows, pairs, get_task(ctx.cfg.task).gold_score))
        except TaskError as e:  # prompts that are not the task's (pairs built from other data): no audit
            summary["gold/audit_skipped"] = str(e)[:200]
    rm_path = next((r["reward_model"].get("path") for r in rows if r.get("reward_model")), None)
    summary.update(label_quality(rm_path, margins))
    if summary.get("gold/chosen_better") is not None:
        print(f"[pairs] gold audit: the chosen answer is gold-better in {summary['gold/chosen_better']:.3f} of the "
              f"pairs; the reward model orders the policy's candidates as gold does "
              f"{summary['gold/rm_pairwise_accuracy'] or 0:.3f} of the time", flush=True)
        warning = estimate_warning(summary)
        if warning:
            summary["label_quality/warning"] = warning
            print(f"[pairs] WARNING: {warning}", flush=True)
    ctx.tracker.log({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    ctx.tracker.log_image("pairs_summary", png)
    ctx.tracker.log_artifact(ctx.dir / "pairs.jsonl", name=f"{ctx.cfg.name}-pairs-r{ctx.round}", type_="dataset")
    return summary


def save_dataset(pairs: list[dict], path: Path) -> None:
    """HF dataset beside the JSONL (an empty one keeps the columns, so loading it never fails on the schema)."""
    import shutil

    from datasets import Dataset

    if path.exists():
        shutil.rmtree(path)
    if pairs:
        Dataset.from_list(pairs).save_to_disk(str(path))
    else:
        cols = ["prompt_id", "prompt", "chosen", "rejected", "chosen_index", "rejected_index", "chosen_score",
                "rejected_score", "chosen_len", "rejected_len", "generator_sha256", "reward_model_sha256", "seed"]
        Dataset.from_dict({c: [] for c in cols}).save_to_disk(str(path))


def calibration(margins: list[float], correct: list[bool], bins: int = 5) -> list[tuple[float, float]]:
    """(upper |margin| edge, accuracy) per quantile bin of held-out pairs: how often the reward model orders a pair
    right given how far apart it scores them. The last edge is +inf."""
    order = sorted(range(len(margins)), key=lambda i: abs(margins[i]))
    if not order:
        return []
    bins = max(1, min(bins, len(order)))
    out = []
    for b in range(bins):
        idx = order[b * len(order) // bins:(b + 1) * len(order) // bins]
        if not idx:
            continue
        edge = abs(margins[idx[-1]]) if b < bins - 1 else float("inf")
        out.append((edge, sum(correct[i] for i in idx) / len(idx)))
    return out


def expected_accuracy(table: list[tuple[float, float]], margin: float) -> float:
    """The calibrated accuracy for a pair scored `margin` apart (the first bin whose edge covers it)."""
    for edge, acc in table:
        if abs(margin) <= edge:
            return acc
    return table[-1][1]


def estimate_warning(summary: dict, tolerance: float = 0.1) -> str | None:
    """When the gold audit and the label-quality estimate disagree by more than `tolerance`: the words that say so.
    The estimate assumes the reward model is as accurate on the policy's candidates as on held-out preference
    pairs; on a new task the policy's samples can be harder to rank (seen on `lookup`: estimated 0.92, audit 0.67),
    and without a gold scorer nothing would show it."""
    est, audit = summary.get("label_quality/estimated_accuracy"), summary.get("gold/chosen_better")
    if est is None or audit is None or abs(est - audit) <= tolerance:
        return None
    return (f"the label-quality estimate ({est:.3f}) and the gold audit ({audit:.3f}) disagree by more than "
            f"{tolerance:g}: the reward model ranks the policy's own candidates "
            f"{'worse' if audit < est else 'better'} than it ranks held-out preference pairs, so on data without a "
            "gold scorer read the estimate as an upper bound")


def label_quality(rm_path: str | None, margins: list[float]) -> dict:
    """Estimate how often a pair's chosen answer is really the better one, from the reward model's held-out (test)
    pairs: their accuracy as a function of the score margin, applied to this stage's margins. Calibrated on gold
    order when the task has one, else on the annotators' labels (then label noise makes it an underestimate).
    Printed; in the summary as `label_quality/*`."""
    path = Path(rm_path).parent / "test_margins.jsonl" if rm_path else None
    if not margins or path is None or not path.exists():
        return {}
    held = list(iter_jsonl(path))
    gold = [h for h in held if h.get("gold_order")]
    basis = "gold" if len(gold) >= 20 else "labels"
    rows = gold if basis == "gold" else held
    table = calibration([h["margin"] for h in rows],
                        [(h["margin"] > 0) == (h.get("gold_order", 1) > 0) and h["margin"] != 0 for h in rows])
    est = statistics.fmean(expected_accuracy(table, m) for m in margins)
    print(f"[pairs] estimated label accuracy {est:.3f}: the reward model orders {len(rows)} held-out pairs (against "
          f"{basis}) right {statistics.fmean(a for _, a in table):.3f} of the time on average, more so at larger "
          f"margins; these {len(margins)} pairs have median margin {statistics.median(margins):.3f}", flush=True)
    return {"label_quality/estimated_accuracy": est, "label_quality/basis": basis,
            "label_quality/calibration": [[e if e != float("inf") else None, a] for e, a in table]}
