"""The `evaluate` stage: sample each policy on held-out prompts and compare it with the SFT policy.

    prefopt evaluate experiments/quickstart.yaml
    prefopt evaluate experiments/quickstart.yaml --evaluate.temperature=0.7 --evaluate.judge.model=<judge folder>

Per policy (same prompts): mean gold score (when the task has one), mean reward-model score, win rate against the
baseline by the reward model and by gold (every sample against every baseline sample of the same prompt, ties 1/2)
and the reward model's length-controlled win rate beside it, the Monte-Carlo sequence-level KL to the baseline, mean
response length in tokens, and optionally an order-swapped pairwise judge's win rate against the baseline (raw and
length-controlled). The reward model reads each sample as the `score` stage gives it one (`rm_format`: a hub reward
model gets the raw prompt in its own chat template).

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
  table.md, evaluate.png   the comparison table and figure
  summary.json             {"policies": {name: {gold_score, rm_score, win_rate_vs_sft, win_rate_vs_sft_lc, kl_to_sft,
                           length, identical_pairs, ...}}, "sampling_seeds": {set: seed}, "best_of_n": [...]}

Preemption: the stage keeps no partial results, so SIGTERM / SIGINT / SIGUSR1 stop it at once, wherever it is
(sampling, log-probs, scoring, the suite, the final writes): one line, exit code 143 (prefopt.runtime.faults.StagePreempted),
no completion marker, and the rerun starts it over (only lm-eval's results per policy, already written, are reused:
suite.py). The table, the samples and every JSON file are written whole, by rename (a temporary file the signal
cut is removed); a figure it cuts is a file of a stage not done, which the rerun draws again.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from prefopt.runtime import faults
from prefopt.data.loaders import load_prompts
from prefopt.data.templates import encode, prompt_text, render_prompt
from prefopt.evaluate import metrics as M
from prefopt.training import logps as L
from prefopt.training import throughput
from prefopt.evaluate.overopt import curve_warnings, verdicts
from prefopt.evaluate.suite import check_files as check_suite_files
from prefopt.evaluate.suite import merge_suite, run_suite
from prefopt.experiment import ref_stage
from prefopt.generation.base import Sampling, derive_seed
from prefopt.stage import atomic_write, write_json
from prefopt.dist.process import seed_everything
from prefopt.io import weights_sha256, write_jsonl
from tqdm.auto import tqdm

# (figure, column head); a figure with a `<figure>_se` beside it is printed as "mean ± standard error"
COLUMNS = [("gold_score", "gold"), ("gold_gain", "gold − SFT"), ("win_rate_vs_sft_gold", "win vs SFT (gold)"),
           ("rm_score", "RM"), ("win_rate_vs_sft", "win vs SFT (RM)"), ("win_rate_vs_sft_lc", "LC win vs SFT (RM)"),
           ("kl_to_sft", "KL to SFT"), ("kl_to_sft_bound", "KL bound (best-of-n)"), ("length", "length"),
           ("judge_win_rate", "judge win"), ("judge_win_rate_lc", "LC judge win"),
           ("judge_order_disagreement", "judge order disagree")]


def sampling_seed(eval_seed: int, run_seed: int, name: str) -> int:
    """The seed sample set `name` is drawn under: (evaluate.seed, experiment seed, name) hashed, so no two sets share
    random numbers and a set redrawn later is drawn alike."""
    return derive_seed(eval_seed, run_seed, name)


def active_policies(cfg, policies: dict[str, str]) -> dict[str, str]:
    """Policies whose stage runs in this experiment (`stage:dpo` needs "dpo" in stages); plain paths stay."""
    return {n: ref for n, ref in policies.items()
            if not (isinstance(ref, str) and ref.startswith("stage:")) or ref_stage(ref) in cfg.stages}


def gold_scorer(cfg, task: str):
    """The task's checked `gold_score(example, response)`, or None when the experiment has no gold task."""
    from prefopt.gold import get_task, has_gold

    if task == "auto":
        return get_task(cfg.task).gold_score if has_gold(cfg.task) else None
    if task == "none":
        return None
    return get_task(task).gold_score


def _free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_lm(path: str, dtype: str, trust_remote_code: bool):
    from prefopt.models.loading import load_causal_lm

    if _device() == "cpu":
        dtype = "float32"  # half precision on CPU is slow and changes the log-probs
    return load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code).to(_device()).eval()


def sample_policy(name: str, path: str, rows: list[dict], sec, n: int | None = None, seed: int | None = None) -> dict:
    """Rendered prompts, their token ids, and n (default sec.samples_per_prompt) completions per prompt."""
    from prefopt.generation import make_generator
    from prefopt.models.loading import load_tokenizer

    tok = load_tokenizer(path, trust_remote_code=sec.trust_remote_code)
    rendered = [render_prompt(r["prompt"], tok) for r in rows]
    # Tokenized exactly as the generators do (one BOS, `encode`), so the log-probs are of what was sampled.
    prompt_ids = [encode(t, tok) for t in rendered]
    seed = sec.seed if seed is None else seed
    gen = make_generator(path, backend=sec.backend, batch_size=sec.batch_size, dtype=sec.dtype, seed=seed)
    sampling = Sampling(n=n or sec.samples_per_prompt, temperature=sec.temperature, top_p=sec.top_p,
                        max_new_tokens=sec.max_new_tokens, seed=seed)
    bar = tqdm(total=len(rows), desc=f"generate {name}", unit="prompt")

    def progress(done: int, tokens: int) -> None:  # prompts in the batch just finished
        bar.update(done)

    outs = gen.generate(rendered, sampling, progress=progress)
    bar.close()
    if hasattr(gen, "close"):  # vLLM: tear the engine down, or the next policy's engine may not fit (vLLM #23793)
        gen.close()
    del gen
    _free()
    return {"rendered": rendered, "prompt_ids": prompt_ids, "completions": outs, "pad_id": tok.pad_token_id or 0}


def _flat(s: dict) -> tuple[list, list]:
    """(prompt ids, response ids) per sample, prompt-major."""
    pids, rids = [], []
    for p, comps in zip(s["prompt_ids"], s["completions"]):
        for c in comps:
            pids.append(p)
            rids.append(list(c.token_ids))
    return pids, rids


def _nest(flat: list[float], samples: dict) -> list[list[float]]:
    out, i = [], 0
    for comps in samples["completions"]:
        out.append(flat[i:i + len(comps)])
        i += len(comps)
    return out


def alpaca_rows(name: str, rows: list[dict], completions) -> list[dict]:
    """AlpacaEval's model-output format: one output per instruction (the first sample), `input` only when set."""
    out = []
    for r, comps in zip(rows, completions):
        meta = r.get("meta") or {}
        item = {"instruction": meta.get("instruction") or prompt_text(r["prompt"])}
        if meta.get("input"):
            item["input"] = meta["input"]
        item["output"] = comps[0].text
        item["generator"] = name
        out.append(item)
    return out


def _fmt(v, se=None) -> str:
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
        lines.append(f"| {name} | " + " | ".join(_fmt(p.get(k), p.get(k + "_se")) for k, _ in cols) + " |")
    return head + "\n".join(lines) + "\n"


def plot(policies: dict[str, dict], path: Path) -> bool:
    """Bars of the gold (else RM) score per policy, and that score against the KL to the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "gold_score" if any(p.get("gold_score") is not None for p in policies.values()) else "rm_score"
    names = [n for n, p in policies.items() if p.get(key) is not None]
    if not names:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
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
    ax2.set_xlabel("KL to baseline (nats; Monte-Carlo, best-of-n estimated from its samples)")
    ax2.set_ylabel(key.replace("_", " "))
    ax2.set_title(f"{key.replace('_', ' ')} vs KL")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def find_checkpoints(model_path: str) -> list[tuple[int, str]]:
    """(step, folder) of every loadable checkpoint an aligner saved beside its final `model/`: trainer checkpoints
    `checkpoints/checkpoint-N` and PPO policy snapshots `snapshots/iter-N`, in step order."""
    stage = Path(model_path).parent
    found = []
    for pattern in ("checkpoints/checkpoint-*", "snapshots/iter-*"):
        for p in stage.glob(pattern):
            step = p.name.rsplit("-", 1)[-1]
            if step.isdigit() and (p / "config.json").exists():
                found.append((int(step), str(p)))
    return sorted(found)


def proxy_scorer(ctx, sec, rows: list[dict] = ()):
    """(name, fn(rendered prompts, rows, completions) -> nested scores) for the reward model or reward function, or
    None. Loaded lazily, once; `evaluate.rm_format` is checked here, on `rows`, before anything is sampled."""
    if sec.reward_fn:
        from prefopt.scoring.functions import load_reward_function

        fn = load_reward_function(sec.reward_fn, ctx.cfg.task)

        def score_fn(s, rows):
            flat_rows = [{**r, "prompt": p} for r, p, comps in zip(rows, s["rendered"], s["completions"])
                         for _ in comps]
            flat = fn(flat_rows, [c.text for comps in s["completions"] for c in comps])
            return _nest(flat, s)

        return fn.name, score_fn, None
    rm_ref = sec.reward_model
    if not rm_ref or (rm_ref.startswith("stage:") and ref_stage(rm_ref) not in ctx.cfg.stages):
        return None
    from prefopt.scoring.scorer import load_scorer, rm_input_format, rm_prompt, scoring_length
    from prefopt.scoring.scorer import reward_model_config

    # A reward model that needs its own code is refused here, before any policy is sampled, not when it is loaded.
    reward_model_config(ctx.resolve(rm_ref), sec.trust_remote_code, "evaluate.trust_remote_code")
    key = "evaluate.rm_format"
    fmt = rm_input_format(sec.rm_format, ctx.resolve(rm_ref), key, rm_ref.startswith("stage:"), sec.trust_remote_code)
    # As many tokens as the reward model takes unless the config says fewer (a length above its limit is an error).
    length = scoring_length(ctx.resolve(rm_ref), sec.rm_max_length, "evaluate.rm_max_length", sec.trust_remote_code,
                            "evaluate.trust_remote_code")
    for r in rows:
        rm_prompt(r, "", fmt, key)
    holder = {}

    def score_fn(s, rows):
        if "scorer" not in holder:
            holder["scorer"] = load_scorer(ctx.resolve(rm_ref), sec.trust_remote_code, key="evaluate.trust_remote_code")
            holder["model"], holder["tok"] = holder["scorer"].model, holder["scorer"].tokenizer
        prompts = [rm_prompt(r, p, fmt, key) for r, p, comps in zip(rows, s["rendered"], s["completions"])
                   for _ in comps]
        responses = [c.text for comps in s["completions"] for c in comps]
        return _nest(holder["scorer"].score(prompts, responses, sec.batch_size, length), s)

    return rm_ref, score_fn, holder


def _lengths(s: dict) -> list[list[int]]:
    return [[len(c.token_ids) for c in cs] for cs in s["completions"]]


def _ids(s: dict) -> list[list[tuple]]:
    return [[tuple(c.token_ids) for c in cs] for cs in s["completions"]]


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
                lc = M.length_controlled_win_rate(*M.rm_preference_pairs(rm, base_rm, _lengths(s), _lengths(base_s)))
                f["win_rate_vs_sft_lc"], f["win_rate_vs_sft_lc_se"] = lc["win_rate"], lc["se"]
                f["rm_length_coef"] = lc["length_coef"]
    if base_s is not None and not is_baseline:
        put("identical_pairs", [M.prompt_identical_rate(a, b) for a, b in zip(_ids(s), _ids(base_s))])
    if own is not None and ref is not None:
        put("kl_to_sft", M.per_prompt_means(_nest([a - b for a, b in zip(own, ref)], s)))
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
    return {"judge_win_rate": win, "judge_win_rate_se": se, "judge_win_rate_lc": lc["win_rate"],
            "judge_win_rate_lc_se": lc["se"], "judge_length_coef": lc["length_coef"],
            "judge_order_disagreement": judged["disagreement"], "judge_identical_pairs": sum(same) / len(same)}


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
    sec = ctx.section
    seed_everything(ctx.seed)
    policies = {n: ctx.resolve(ref) for n, ref in active_policies(ctx.cfg, sec.policies).items()}
    if not policies:
        raise ValueError("evaluate: no policy to evaluate (every stage named in evaluate.policies is off)")
    base = sec.baseline if sec.baseline in policies else None
    if base is None:
        print(f"[evaluate] baseline {sec.baseline!r} is not among the policies {list(policies)}: "
              "no win rates or KL", flush=True)
    check_suite_files(sec.suite)  # a bad multiple-choice or perplexity file stops the stage before any sampling
    spec = sec.prompts if sec.split == "test" else sec.validation_prompts
    rows = load_prompts(spec, sec.template, resolve=lambda p: ctx.resolve(p, model=False)).rows
    print(f"[evaluate] {len(rows)} {sec.split} prompts from {ctx.resolve(spec.path, model=False)}", flush=True)
    gold_fn = gold_scorer(ctx.cfg, sec.task)
    proxy = proxy_scorer(ctx, sec, rows)

    # 0. What to sample: each policy on every prompt; with `checkpoints`, each saved aligner checkpoint on the first
    #    `checkpoint_prompts`; with `best_of_n`, the baseline once more with max(n) samples per prompt.
    k_ckpt = min(sec.checkpoint_prompts or len(rows), len(rows))
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

    # 1. Samples: every set on the same prompts, each under its own seed (independent of every other set's draws).
    seeds = {name: sampling_seed(sec.seed, ctx.seed, name) for name in sets}
    samples = {name: sample_policy(name, st["path"], st["rows"], sec, n=st["n"], seed=seeds[name])
               for name, st in sets.items()}
    for name in policies:
        write_json(ctx.dir / f"{name}.json", alpaca_rows(name, rows, samples[name]["completions"]))

    # 2. Log-probs at the sampling temperature: each set on its own samples, the baseline on everyone's.
    T = sec.temperature if sec.temperature > 0 else 1.0  # greedy: no sampling distribution; report T=1 log-probs
    own, ref = {}, {}
    meter = throughput.Meter(0.0)  # perf/*: the log-prob passes (peak probed on the first model's device)
    logp_sets = [n for n in sets if n != "_bon"]
    for name in logp_sets:
        model = _load_lm(sets[name]["path"], sec.dtype, sec.trust_remote_code)
        own[name] = L.response_logps(model, *_flat(samples[name]), pad_id=samples[name]["pad_id"], temperature=T,
                                     batch_size=sec.batch_size, desc=f"log-probs {name}", meter=meter)
        if name == base:
            for other in logp_sets:
                s = samples[other]
                ref[other] = (own[name] if other == name else
                              L.response_logps(model, *_flat(s), pad_id=s["pad_id"], temperature=T,
                                               batch_size=sec.batch_size, desc=f"baseline log-probs {other}",
                                               meter=meter))
        del model
        _free()
    if base is not None and base in logp_sets:  # the baseline was loaded before some checkpoints: score them too
        missing = [n for n in logp_sets if n not in ref]
        if missing:
            model = _load_lm(policies[base], sec.dtype, sec.trust_remote_code)
            for other in missing:
                s = samples[other]
                ref[other] = L.response_logps(model, *_flat(s), pad_id=s["pad_id"], temperature=T,
                                              batch_size=sec.batch_size, desc=f"baseline log-probs {other}",
                                              meter=meter)
            del model
            _free()

    # 3. Reward-model (or reward-function) and gold scores of every sample.
    rm, gold = {}, {}
    if proxy is not None:
        for name in tqdm(list(sets), desc="reward", unit="set"):
            rm[name] = proxy[1](samples[name], sets[name]["rows"])
        if proxy[2]:
            proxy[2].clear()
            _free()
    if gold_fn is not None:
        from prefopt.gold import example

        for name, st in sets.items():
            exs = [example(r) for r in st["rows"]]
            gold[name] = [[gold_fn(ex, c.text) for c in comps] for ex, comps in zip(exs, samples[name]["completions"])]

    # 4. Optional order-swapped judge: each policy's first sample against the baseline's, per prompt.
    judged = {}
    if sec.judge.model and base is not None:
        from prefopt.evaluate.judge import LMJudge, judge_pairs
        from prefopt.models.loading import load_tokenizer

        jpath = ctx.resolve(sec.judge.model)
        judge = LMJudge(_load_lm(jpath, sec.dtype, sec.trust_remote_code),
                        load_tokenizer(jpath, trust_remote_code=sec.trust_remote_code),
                        chat=sec.judge.chat, batch_size=sec.judge.batch_size)
        k = min(sec.judge.max_prompts, len(rows))
        instructions = [alpaca_judge_instruction(r) for r in rows[:k]]
        for name in tqdm([n for n in policies if n != base], desc="judge", unit="policy"):
            judged[name] = judge_pairs(judge.prob_a, instructions,
                                       [c[0].text for c in samples[name]["completions"][:k]],
                                       [c[0].text for c in samples[base]["completions"][:k]])
        del judge
        _free()

    # 5. Figures per policy, with standard errors over prompts.
    def fig(name, k=None):
        k = k or len(sets[name]["rows"])
        base_s = _subset(samples[base], k) if base is not None else None
        return figures_of(name, samples[name], gold.get(name), rm.get(name), own.get(name), ref.get(name),
                          gold[base][:k] if base in gold else None, rm[base][:k] if base in rm else None, base_s,
                          is_baseline=name == base)

    figures: dict[str, dict] = {}
    for name in policies:
        f = {"model": policies[name], **fig(name)}
        if name in judged:
            f.update(judge_figures(judged[name], samples[name], samples[base], min(sec.judge.max_prompts, len(rows))))
        figures[name] = f
        ctx.tracker.log({f"{name}/{k}": v for k, v in f.items() if isinstance(v, (int, float))})
        write_jsonl(ctx.dir / f"samples_{name}.jsonl", _sample_rows(name, rows, samples[name], gold, rm, own, ref))

    # 6. Curves: each aligner's checkpoints (and the baseline at step 0) on the first k_ckpt prompts; best-of-n.
    curves = {}
    if sec.checkpoints and base is not None:
        start = _point(0, fig_subset(samples[base], gold.get(base), rm.get(base), k_ckpt), kl=0.0)
        for name in policies:
            if name == base:
                continue
            pts = [start] + [_point(sets[n]["step"], fig(n, k_ckpt)) for n in sets if sets[n].get("method") == name]
            pts.append(_point("final", figures_of(name, _subset(samples[name], k_ckpt),
                                                  _sub(gold.get(name), k_ckpt), _sub(rm.get(name), k_ckpt),
                                                  own[name][:_count(samples[name], k_ckpt)],
                                                  ref[name][:_count(samples[name], k_ckpt)] if name in ref else None,
                                                  _sub(gold.get(base), k_ckpt), _sub(rm.get(base), k_ckpt),
                                                  _subset(samples[base], k_ckpt))))
            curves[name] = pts
    bon = []
    if "_bon" in samples and "_bon" in rm:
        write_jsonl(ctx.dir / "samples_best_of_n.jsonl", _sample_rows("_bon", rows, samples["_bon"], gold, rm, {}, {}))
        for n in sorted(set(sec.best_of_n)):
            pick = M.best_of_n(rm["_bon"], n)
            g = [[gold["_bon"][i][j]] for i, j in enumerate(pick)] if "_bon" in gold else None
            r = [[rm["_bon"][i][j]] for i, j in enumerate(pick)]
            # KL of best-of-n from the max(n) samples of each prompt, ties counted; the analytical bound beside it
            kl, kl_se = M.mean_se(M.best_of_n_kl_estimate(_ids(samples["_bon"]), rm["_bon"], n))
            point = {"n": n, "kl": kl, "kl_se": kl_se, "kl_bound": M.best_of_n_kl_bound(n)}
            for key, vals in (("gold", g), ("rm", r)):
                if vals is not None:
                    point[key], point[key + "_se"] = M.mean_se(M.per_prompt_means(vals))
            if g is not None and base in gold:
                point["gold_gain"], point["gold_gain_se"] = M.mean_se(
                    [a[0] - b for a, b in zip(g, M.per_prompt_means(gold[base]))])
            bon.append(point)
        figures.update({f"best_of_{p['n']}": {"gold_score": p.get("gold"), "gold_score_se": p.get("gold_se"),
                                              "rm_score": p["rm"], "rm_score_se": p["rm_se"], "kl_to_sft": p["kl"],
                                              "kl_to_sft_se": p["kl_se"], "kl_to_sft_bound": p["kl_bound"],
                                              "gold_gain": p.get("gold_gain"), "gold_gain_se": p.get("gold_gain_se")}
                        for p in bon})

    figures = merge_suite(figures, run_suite(policies, sec.suite, ctx.dir, ctx.tracker))  # perplexity, MC, lm-eval
    bon_curve = [{"step": f"n={p['n']}", "kl": p["kl"], "gold": p.get("gold"), "gold_se": p.get("gold_se"),
                  "rm": p.get("rm")} for p in bon]
    warnings = verdicts(figures, base) + curve_warnings({**curves, "best-of-n": bon_curve} if bon else curves)
    for w in warnings:
        print(f"[evaluate] WARNING {w}", flush=True)
    md = table(figures, sec.split, len(rows)) + "".join(f"\n- **warning**: {w}" for w in warnings)
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
    perf = meter.summary()
    ctx.tracker.log(perf)
    print(f"[prefopt] evaluate: log-prob passes {throughput.describe(perf)}", flush=True)
    return {
        "policies": figures,
        "baseline": base,
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
        **perf,
    }


def _count(s: dict, k: int) -> int:
    """Samples in the first k prompts of a sample set (flat index bound)."""
    return sum(len(c) for c in s["completions"][:k])


def _sub(nested, k: int):
    return None if nested is None else nested[:k]


def _subset(s: dict, k: int) -> dict:
    return {**s, "rendered": s["rendered"][:k], "prompt_ids": s["prompt_ids"][:k], "completions": s["completions"][:k]}


def fig_subset(s: dict, gold, rm, k: int) -> dict:
    out = {}
    if gold is not None:
        out["gold_score"], out["gold_score_se"] = M.mean_se(M.per_prompt_means(gold[:k]))
    if rm is not None:
        out["rm_score"], out["rm_score_se"] = M.mean_se(M.per_prompt_means(rm[:k]))
    return out


def _point(step, f: dict, kl: float | None = None) -> dict:
    return {"step": step, "kl": f.get("kl_to_sft") if kl is None else kl, "kl_se": f.get("kl_to_sft_se"),
            "gold": f.get("gold_score"), "gold_se": f.get("gold_score_se"),
            "rm": f.get("rm_score"), "rm_se": f.get("rm_score_se")}


def alpaca_judge_instruction(row: dict) -> str:
    """What the judge reads as the instruction: the original instruction (and input), else the prompt text."""
    meta = row.get("meta") or {}
    if meta.get("instruction"):
        return meta["instruction"] + (f"\n\n{meta['input']}" if meta.get("input") else "")
    return prompt_text(row["prompt"])


def _sample_rows(name, rows, s, gold, rm, own, ref):
    i = 0
    for j, (r, comps) in enumerate(zip(rows, s["completions"])):
        for k, c in enumerate(comps):
            yield {
                "prompt_id": r["prompt_id"], "prompt": s["rendered"][j], "sample": k, "response": c.text,
                "tokens": len(c.token_ids), "finished": c.finished,
                "gold": gold[name][j][k] if name in gold else None,
                "rm": rm[name][j][k] if name in rm else None,
                "logp": own[name][i] if name in own else None, "ref_logp": ref[name][i] if name in ref else None,
            }
            i += 1
