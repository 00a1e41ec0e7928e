"""The `evaluate` stage: sample each policy on held-out prompts and compare it with the SFT policy.

    prefopt evaluate experiments/quickstart.yaml
    prefopt evaluate experiments/quickstart.yaml --evaluate.temperature=0.7 --evaluate.judge.model=<judge folder>

Per policy (same prompts): mean gold score (when the task has one), mean reward-model score, win rate against the
baseline by the reward model and by gold (every sample against every baseline sample of the same prompt, ties 1/2)
and the reward model's length-controlled win rate beside it, the Monte-Carlo sequence-level KL to the baseline, mean
response length in tokens, and optionally an order-swapped pairwise judge's win rate against the baseline (raw and
length-controlled). The reward model reads each sample as the `score` stage gives it one (`rm_format`: a hub reward
model gets the raw prompt in its own chat template).

Reference answers (`evaluate.reference`, AlpacaEval's way): every policy's samples, the baseline's included, against
one fixed answer per prompt (e.g. gpt4_1106_preview's), by the reward model, gold and the judge, raw and
length-controlled: `win_rate_vs_ref*`, `judge_win_rate_vs_ref*` (evaluate/reference.py).

Independent samples. Every sample set (each policy, each checkpoint, the best-of-n draw) is sampled under its own
seed, derived from (evaluate.seed, the experiment's seed, the set's name) and recorded in `sampling_seeds`. With one
seed for all, sample j of a policy and sample j of the baseline shared their random numbers: a lightly tuned policy
gave the very same response in 63% of those pairs, each a tie that pulls the win rate towards 1/2 (and the judge,
which reads sample 0 of each side, saw only such pairs). `identical_pairs` reports the fraction of compared pairs
that are the same response; for independent draws it is sum_y pi(y) pi_sft(y) (tests/test_unbiased_eval.py).

Length control. `win_rate_vs_sft_lc` and `judge_win_rate_lc` are AlpacaEval 2's length-controlled win rates
(Dubois et al. 2024): a logistic regression of each pair's preference on a policy term and tanh(length difference /
its sd), read at length difference 0 (`metrics.length_controlled_win_rate`, which states how it departs from
AlpacaEval's GLM). A policy that wins only by answering longer gets an LC win rate near 1/2.

Best-of-n. Rows `best_of_<n>` keep the reward model's best of the first n of max(n) baseline samples per prompt. Their
`kl_to_sft` is the exact KL of best-of-n under the empirical distribution of each prompt's max(n) samples, ties
included (Beirami et al. 2024; `metrics.best_of_n_kl_estimate`), with its standard error over prompts;
`kl_to_sft_bound` is the analytical log n - (n-1)/n, an upper bound approached only when no single answer has
appreciable probability (continuous scores). The over-optimisation plot draws the estimate.

KL. For samples y ~ pi_T(.|x) (the policy at the sampling temperature T), the stage reports
    mean over samples of [ log pi_T(y|x) - log pi_sft,T(y|x) ]
with both log-probs computed from logits divided by T: an unbiased estimate of KL(pi_T || pi_sft,T), which at
T = 1 (the default) is the sequence-level KL(pi || pi_sft) of the DPO/RLHF objectives. top_p < 1 truncates the
sampling distribution, which these log-probs do not model: the figure is then only approximate. Responses cut at
max_new_tokens count as the prefixes they are. With temperature 0 (greedy) there is no sampling distribution;
the T = 1 log-prob difference of the greedy responses is reported instead. The baseline scores the policy's own token
ids, so the two must share a tokenizer (true for policies trained from the SFT model).

Outputs in the stage folder:
  <policy>.json            AlpacaEval format, the first sample per prompt: [{instruction, input?, output, generator}]
  samples_<policy>.jsonl   every sample with its figures (gold, rm, logp, ref_logp, tokens)
  samples_best_of_n.jsonl  the max(n) baseline samples per prompt best-of-n picks from (rm, gold, tokens)
  samples_reference.jsonl  the reference answers with their scores (with `evaluate.reference`)
  table.md, evaluate.png   the comparison table and figure
  summary.json             {"policies": {name: {gold_score, rm_score, win_rate_vs_sft, win_rate_vs_sft_lc, kl_to_sft,
                           length, identical_pairs, ...}}, "sampling_seeds": {set: seed}, "best_of_n": [...]}

Preemption: the stage keeps no partial results, so SIGTERM / SIGINT / SIGUSR1 stop it at once, wherever it is
(sampling, log-probs, scoring, the suite, the final writes): one line, exit code 143
(prefopt.runtime.faults.StagePreempted), no completion marker, and the rerun starts it over (only lm-eval's results
per policy, already written, are reused: suite.py). The table, the samples and every JSON file are written whole, by
rename (a temporary file the signal cut is removed); a figure it cuts is a file of a stage not done, which the rerun
draws again.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm

from prefopt.data.loaders import load_prompts
from prefopt.dist.process import seed_everything
from prefopt.evaluate.figures import Draws, best_of_n_points, best_of_n_rows, curve_point, fig_subset, judge_figures
from prefopt.evaluate import reference as REF
from prefopt.evaluate.overopt import curve_warnings, verdicts
from prefopt.evaluate.samples import (alpaca_judge_instruction, alpaca_rows, find_checkpoints, flat, free_memory,
                                      load_lm, sample_policy, sample_rows, sampling_seed, scoring_batch_size, token_ids)
from prefopt.evaluate.scorers import gold_scorer, proxy_scorer
from prefopt.evaluate.suite import check_files as check_suite_files
from prefopt.evaluate.suite import merge_suite, run_suite
from prefopt.evaluate.table import plot, table
from prefopt.experiment import ref_stage
from prefopt.io import weights_sha256, write_jsonl
from prefopt.models.loading import load_tokenizer
from prefopt.runtime import faults
from prefopt.stage import atomic_write, write_json
from prefopt.training import logps as L
from prefopt.training import throughput


def run(ctx) -> dict:
    """The whole stage is the piece of work a signal drops (faults.ShardSignals): nothing of it is kept as done."""
    notice = "stopping now; evaluate keeps no partial results, the rerun starts it over"
    with faults.ShardSignals(ctx.stage, notice) as signals:
        try:
            with signals.sampling():
                return _run(ctx)
        except faults.ShardDropped:
            for tmp in ctx.dir.glob(f".*.tmp{os.getpid()}"):  # an atomic write the signal cut before its rename
                tmp.unlink(missing_ok=True)
            raise faults.StagePreempted(ctx.stage, signals.signum) from None


def _run(ctx) -> dict:
    """Setup, samples, log-probs, scores, the judge, figures and curves, then the table and files, in that order."""
    sec = ctx.section
    seed_everything(ctx.seed)
    policies, base, rows, ref = setup(ctx, sec)
    gold_fn = gold_scorer(ctx.cfg, sec.task)
    proxy = proxy_scorer(ctx, sec, rows)
    k_ckpt = min(sec.checkpoint_prompts or len(rows), len(rows))
    sets = sample_sets(sec, policies, base, rows, k_ckpt)

    # Samples: every set on the same prompts, each under its own seed (independent of every other set's draws).
    seeds = {name: sampling_seed(sec.seed, ctx.seed, name) for name in sets}
    d = Draws(sets, {name: sample_policy(name, st["path"], st["rows"], sec, n=st["n"], seed=seeds[name])
                     for name, st in sets.items()}, base)
    for name in policies:
        write_json(ctx.dir / f"{name}.json", alpaca_rows(name, rows, d.samples[name]["completions"]))
    if ref is not None:
        add_reference(sec, d, policies, rows, ref[0])
    meter = throughput.Meter(0.0)  # perf/*: the log-prob passes (peak probed on the first model's device)
    d.own, d.ref = logprobs(sec, d, policies, meter)
    d.rm, d.gold = scores(d, proxy, gold_fn)
    judged = judge(ctx, sec, rows, policies, d)

    figures = policy_figures(ctx, sec, rows, policies, d, judged)
    reference = reference_summary(ctx, d, rows, ref[1]) if ref is not None else None
    curves = checkpoint_curves(sec, policies, d, k_ckpt)
    bon = []
    if "_bon" in d.samples and "_bon" in d.rm:
        write_jsonl(ctx.dir / "samples_best_of_n.jsonl", sample_rows("_bon", rows, d.samples["_bon"], d.gold, d.rm,
                                                                     {}, {}))
        bon = best_of_n_points(d.rm["_bon"], d.gold.get("_bon"), token_ids(d.samples["_bon"]), d.gold.get(base),
                               sec.best_of_n)
        figures.update(best_of_n_rows(bon))
    figures = merge_suite(figures, run_suite(policies, sec.suite, ctx.dir, ctx.tracker))  # perplexity, MC, lm-eval

    warnings = save(ctx, sec, figures, curves, bon, base, len(rows))
    return {
        "policies": figures,
        "baseline": base,
        "reference": reference,
        "split": sec.split,
        "num_prompts": len(rows),
        "samples_per_prompt": sec.samples_per_prompt,
        "temperature": sec.temperature,
        "seed": sec.seed,
        "sampling_seeds": {("best_of_n" if n == "_bon" else n): v for n, v in seeds.items()},
        "proxy": proxy[0] if proxy else None,
        "curves": curves,
        "best_of_n": bon,
        "warnings": warnings,
        **perf_figures(ctx, meter),
    }


def perf_figures(ctx, meter) -> dict:
    perf = meter.summary()  # into summary.json, and W&B's run summary through the tracker
    print(f"[prefopt] evaluate: log-prob passes {throughput.describe(perf)}", flush=True)
    return perf


# ---------------------------------------------------------------------------------------------------- setup


def active_policies(cfg, policies: dict[str, str]) -> dict[str, str]:
    """Policies whose stage runs in this experiment (`stage:dpo` needs "dpo" in stages); plain paths stay."""
    return {n: ref for n, ref in policies.items()
            if not (isinstance(ref, str) and ref.startswith("stage:")) or ref_stage(ref) in cfg.stages}


def setup(ctx, sec) -> tuple[dict[str, str], str | None, list[dict], tuple[list[str], str] | None]:
    """(policies by name -> model folder, the baseline's name or None, the prompt rows, (the reference answer to
    each, where they were read) or None). The suite's files and the reference are read here: a bad multiple-choice or perplexity file, or
    a prompt the reference does not answer, stops the stage before any sampling."""
    policies = {n: ctx.resolve(ref) for n, ref in active_policies(ctx.cfg, sec.policies).items()}
    if not policies:
        raise ValueError("evaluate: no policy to evaluate (every stage named in evaluate.policies is off)")
    base = sec.baseline if sec.baseline in policies else None
    if base is None:
        print(f"[evaluate] baseline {sec.baseline!r} is not among the policies {list(policies)}: "
              "no win rates or KL", flush=True)
    check_suite_files(sec.suite)
    spec = sec.prompts if sec.split == "test" else sec.validation_prompts
    # chat turns checked against the first policy's template (a stage's template matches its models': experiment.py)
    tok = (load_tokenizer(next(iter(policies.values())), trust_remote_code=sec.trust_remote_code)
           if sec.template == "chat" else None)
    where = lambda p: ctx.resolve(p, model=False)  # noqa: E731
    loaded = load_prompts(spec, sec.template, resolve=where, tokenizer=tok)
    rows = loaded.rows
    print(f"[evaluate] {len(rows)} {sec.split} prompts from {loaded.path}", flush=True)
    ref = None
    if sec.reference.path or sec.reference.mixture:
        ref = REF.answers(sec.reference, sec.template, rows, loaded.path, resolve=where, tokenizer=tok)
        print(f"[evaluate] reference answers to the {len(rows)} prompts from {ref[1]}", flush=True)
    return policies, base, rows, ref


def sample_sets(sec, policies: dict[str, str], base: str | None, rows: list[dict], k_ckpt: int) -> dict[str, dict]:
    """What to sample: each policy on every prompt; with `checkpoints`, each saved aligner checkpoint on the first
    `k_ckpt` (`checkpoint_prompts`); with `best_of_n`, the baseline once more (`_bon`) with max(n) samples per
    prompt."""
    sets: dict[str, dict] = {n: {"path": p, "rows": rows, "n": sec.samples_per_prompt} for n, p in policies.items()}
    if sec.checkpoints:
        for name, path in policies.items():
            if name == base:
                continue
            final_sha = weights_sha256(path)
            for step, ck in find_checkpoints(path):
                if weights_sha256(ck) == final_sha:
                    continue  # the final model itself: the curve's "final" point
                sets[f"{name}@{step}"] = {"path": ck, "rows": rows[:k_ckpt], "n": sec.samples_per_prompt,
                                          "method": name, "step": step}
    if sec.best_of_n and base is not None:
        sets["_bon"] = {"path": policies[base], "rows": rows, "n": max(sec.best_of_n)}
    return sets


def add_reference(sec, d: Draws, policies: dict[str, str], rows: list[dict], texts: list[str]) -> None:
    """The reference answers as one more sample set (`reference.NAME`): not sampled, no log-probs, scored as the
    policies' samples are, on the baseline's (else the first policy's) rendered prompts, in its tokens."""
    like = d.base or next(iter(policies))
    tok = load_tokenizer(policies[like], trust_remote_code=sec.trust_remote_code)
    d.samples[REF.NAME] = REF.sample_set(texts, d.samples[like], tok)
    d.sets[REF.NAME] = {"path": None, "rows": rows, "n": 1}


def reference_summary(ctx, d: Draws, rows: list[dict], source: str) -> dict:
    """The reference's own figures (the summary's `reference`, read from `source`), and its scored answers in
    `samples_reference.jsonl`."""
    write_jsonl(ctx.dir / "samples_reference.jsonl", sample_rows(REF.NAME, rows, d.samples[REF.NAME], d.gold, d.rm,
                                                                 {}, {}))
    return REF.own_figures(d.samples[REF.NAME], d.gold.get(REF.NAME), d.rm.get(REF.NAME), source)


# ---------------------------------------------------------------------------------------------------- scoring


def base_reads_ids(d: Draws, name: str) -> bool:
    """Whether the baseline can score set `name`'s token ids (its KL to the baseline): only where they mean the same
    text to it, i.e. the two tokenizers have one vocabulary (`kl_to_sft_why` where not)."""
    return d.base is not None and d.samples[name]["vocab"] == d.samples[d.base]["vocab"]


def logprobs(sec, d: Draws, policies: dict[str, str], meter=None) -> tuple[dict, dict]:
    """(own, ref): each set's log-probs of its own samples and the baseline's of everyone's, at the sampling
    temperature (greedy has no sampling distribution: T = 1 log-probs are reported instead). Each model is loaded
    once where it can be."""
    T = sec.temperature if sec.temperature > 0 else 1.0
    own, ref = {}, {}
    logp_sets = [n for n in d.sets if not n.startswith("_")]  # not best-of-n's draw nor the reference

    def of(model, name: str, desc: str) -> list[float]:
        s = d.samples[name]
        return L.response_logps(model, *flat(s), pad_id=s["pad_id"], temperature=T,
                                batch_size=scoring_batch_size(sec), desc=desc, meter=meter)

    base_reads = [n for n in logp_sets if base_reads_ids(d, n)]
    for name in logp_sets:
        model = load_lm(d.sets[name]["path"], sec.dtype, sec.trust_remote_code)
        own[name] = of(model, name, f"log-probs {name}")
        if name == d.base:
            for other in base_reads:
                ref[other] = own[name] if other == name else of(model, other, f"baseline log-probs {other}")
        del model
        free_memory()
    missing = [n for n in base_reads if n not in ref]
    if d.base is not None and d.base in logp_sets and missing:  # the baseline was loaded before some checkpoints
        model = load_lm(policies[d.base], sec.dtype, sec.trust_remote_code)
        for other in missing:
            ref[other] = of(model, other, f"baseline log-probs {other}")
        del model
        free_memory()
    return own, ref


def scores(d: Draws, proxy, gold_fn) -> tuple[dict, dict]:
    """(rm, gold): the reward model's (or reward function's) and the task's gold scores of every sample."""
    rm, gold = {}, {}
    if proxy is not None:
        for name in tqdm(list(d.sets), desc="reward", unit="set"):
            rm[name] = proxy[1](d.samples[name], d.sets[name]["rows"])
        if proxy[2]:
            proxy[2].clear()
            free_memory()
    if gold_fn is not None:
        from prefopt.gold import example

        for name, st in d.sets.items():
            exs = [example(r) for r in st["rows"]]
            gold[name] = [[gold_fn(ex, c.text) for c in comps]
                          for ex, comps in zip(exs, d.samples[name]["completions"])]
    return rm, gold


def judge(ctx, sec, rows: list[dict], policies: dict[str, str], d: Draws) -> dict[str, dict]:
    """The optional order-swapped judge: each policy's first sample against the baseline's, per prompt, and each
    policy's against the reference answer. {opponent ("base" | "ref"): {policy: judge_pairs' result}}."""
    judged: dict[str, dict] = {"base": {}, "ref": {}}
    if not sec.judge.model or (d.base is None and REF.NAME not in d.samples):
        return judged
    from prefopt.evaluate.judge import LMJudge, judge_pairs

    jpath = ctx.resolve(sec.judge.model)
    lm_judge = LMJudge(load_lm(jpath, sec.dtype, sec.trust_remote_code),
                       load_tokenizer(jpath, trust_remote_code=sec.trust_remote_code),
                       chat=sec.judge.chat, batch_size=sec.judge.batch_size)
    k = min(sec.judge.max_prompts, len(rows))
    instructions = [alpaca_judge_instruction(r) for r in rows[:k]]
    games = [("base", n, d.base) for n in policies if d.base is not None and n != d.base]
    games += [("ref", n, REF.NAME) for n in policies if REF.NAME in d.samples]
    for against, name, other in tqdm(games, desc="judge", unit="policy"):
        judged[against][name] = judge_pairs(lm_judge.prob_a, instructions,
                                            [c[0].text for c in d.samples[name]["completions"][:k]],
                                            [c[0].text for c in d.samples[other]["completions"][:k]])
    del lm_judge
    free_memory()
    return judged


# ---------------------------------------------------------------------------------------------------- figures


def policy_figures(ctx, sec, rows: list[dict], policies: dict[str, str], d: Draws, judged: dict) -> dict[str, dict]:
    """Figures per policy, with standard errors over prompts (logged, and each sample's written to
    `samples_<policy>.jsonl`)."""
    figures: dict[str, dict] = {}
    judged_prompts = min(sec.judge.max_prompts, len(rows))
    for name in policies:
        f = {"model": policies[name], **d.figures(name)}
        if d.base is not None and not base_reads_ids(d, name):
            f["kl_to_sft_why"] = (f"its tokenizer's vocabulary is not {d.base}'s, whose log-probs of its token ids "
                                  "would be of other text")
        if name in judged["base"]:
            f.update(judge_figures(judged["base"][name], d.samples[name], d.samples[d.base], judged_prompts))
        if REF.NAME in d.samples:
            ref = REF.NAME
            f.update(REF.figures(d.samples[name], d.gold.get(name), d.rm.get(name), d.samples[ref], d.gold.get(ref),
                                 d.rm.get(ref)))
            if name in judged["ref"]:
                f.update(REF.judge_keys(judge_figures(judged["ref"][name], d.samples[name], d.samples[ref],
                                                      judged_prompts)))
        figures[name] = f
        ctx.tracker.log({f"{name}/{k}": v for k, v in f.items() if isinstance(v, (int, float))})
        write_jsonl(ctx.dir / f"samples_{name}.jsonl", sample_rows(name, rows, d.samples[name], d.gold, d.rm, d.own,
                                                                   d.ref))
    return figures


def checkpoint_curves(sec, policies: dict[str, str], d: Draws, k_ckpt: int) -> dict[str, list[dict]]:
    """Each aligner's curve on the first k_ckpt prompts: the baseline at step 0, its checkpoints, its final model."""
    curves = {}
    if not sec.checkpoints or d.base is None:
        return curves
    start = curve_point(0, fig_subset(d.samples[d.base], d.gold.get(d.base), d.rm.get(d.base), k_ckpt), kl=0.0)
    for name in policies:
        if name == d.base:
            continue
        pts = [start] + [curve_point(d.sets[n]["step"], d.figures(n, k_ckpt))
                         for n in d.sets if d.sets[n].get("method") == name]
        pts.append(curve_point("final", d.figures_on_first(name, k_ckpt)))
        curves[name] = pts
    return curves


# ---------------------------------------------------------------------------------------------------- save


def save(ctx, sec, figures: dict[str, dict], curves: dict, bon: list[dict], base: str | None,
         n_prompts: int) -> list[str]:
    """The verdicts (returned, and printed as warnings), `table.md` (with the suite's table), `curves.json`, and the
    figures (`evaluate.png`, `overoptimisation.png`)."""
    bon_curve = [{"step": f"n={p['n']}", "kl": p["kl"], "gold": p.get("gold"), "gold_se": p.get("gold_se"),
                  "rm": p.get("rm")} for p in bon]
    warnings = verdicts(figures, base) + curve_warnings({**curves, "best-of-n": bon_curve} if bon else curves)
    warnings += [f"{name}: no {key[:-len('_why')]} ({why})" for name, f in figures.items()
                 for key, why in f.items() if key.endswith("_why")]
    for w in warnings:
        print(f"[evaluate] WARNING {w}", flush=True)
    md = table(figures, sec.split, n_prompts) + "".join(f"\n- **warning**: {w}" for w in warnings)
    suite_md = ctx.dir / "suite.md"
    if suite_md.exists():  # the suite's figures in the same table file (`prefopt run` prints table.md)
        md += "\n\nEvaluation suite (perplexity, multiple choice, lm-eval):\n\n" + suite_md.read_text().strip()
    atomic_write(ctx.dir / "table.md", md + "\n")  # printed by `prefopt run` / `prefopt evaluate` once done
    write_json(ctx.dir / "curves.json", {"curves": curves, "best_of_n": bon})
    if plot(figures, ctx.dir / "evaluate.png"):
        ctx.tracker.log_image("evaluate", ctx.dir / "evaluate.png")
    if curves or bon:
        from prefopt.analysis import plot_overoptimisation

        plot_overoptimisation(curves, bon, ctx.dir / "overoptimisation.png")
        ctx.tracker.log_image("overoptimisation", ctx.dir / "overoptimisation.png")
    return warnings
