"""The `evaluate` stage: sample each policy on held-out prompts and compare it with the SFT policy.

    prefopt evaluate experiments/quickstart.yaml
    prefopt evaluate experiments/quickstart.yaml --evaluate.temperature=0.7 --evaluate.judge.model=<judge folder>

Per policy (same prompts, same sampling seed for all): mean gold score (when the task has one), mean reward-model
score, win rate against the baseline by the reward model and by gold (every sample against every baseline sample
of the same prompt, ties 1/2), the Monte-Carlo sequence-level KL to the baseline, mean response length in tokens,
and optionally an order-swapped pairwise judge's win rate against the baseline.

KL. For samples y ~ pi_T(.|x) (the policy at the sampling temperature T), the stage reports
    mean over samples of [ log pi_T(y|x) - log pi_sft,T(y|x) ]
with both log-probs computed from logits divided by T: an unbiased estimate of KL(pi_T || pi_sft,T), which at
T = 1 (the default) is the sequence-level KL(pi || pi_sft) of the DPO/RLHF objectives. top_p < 1 truncates the
sampling distribution, which these log-probs do not model: the figure is then only approximate. Responses cut at
max_new_tokens count as the prefixes they are. With temperature 0 (greedy) there is no sampling distribution;
the T = 1 log-prob difference of the greedy responses is reported instead. The baseline scores the policy's own token ids, so the two must
share a tokenizer (true for policies trained from the SFT model).

Outputs in the stage folder:
  <policy>.json            AlpacaEval format, the first sample per prompt: [{instruction, input?, output, generator}]
  samples_<policy>.jsonl   every sample with its figures (gold, rm, logp, ref_logp, tokens)
  table.md, evaluate.png   the comparison table and figure
  summary.json             {"policies": {name: {gold_score, rm_score, win_rate_vs_sft, kl_to_sft, length, ...}}}
"""

from __future__ import annotations

import gc
from pathlib import Path

from prefopt.data.loaders import load_prompts
from prefopt.data.templates import prompt_text, render_prompt
from prefopt.evaluate import metrics as M
from prefopt.experiment import ref_stage
from prefopt.generation.base import Sampling
from prefopt.stage import atomic_write, write_json
from prefopt.utils import seed_everything, write_jsonl
from tqdm.auto import tqdm

COLUMNS = [("gold_score", "gold"), ("rm_score", "RM"), ("win_rate_vs_sft", "win vs SFT (RM)"),
           ("win_rate_vs_sft_gold", "win vs SFT (gold)"), ("kl_to_sft", "KL to SFT"), ("length", "length"),
           ("judge_win_rate", "judge win"), ("judge_order_disagreement", "judge order disagree")]


def active_policies(cfg, policies: dict[str, str]) -> dict[str, str]:
    """Policies whose stage runs in this experiment (`stage:dpo` needs "dpo" in stages); plain paths stay."""
    return {n: ref for n, ref in policies.items()
            if not (isinstance(ref, str) and ref.startswith("stage:")) or ref_stage(ref) in cfg.stages}


def gold_scorer(cfg, task: str):
    """The task's `gold_score(prompt, response)`, or None when the experiment has no gold task."""
    name = cfg.task.name if task == "auto" else task
    if name == "none":
        return None
    from prefopt.tasks import get_task

    return get_task(name).gold_score


def _free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_lm(path: str, dtype: str, trust_remote_code: bool):
    from prefopt.models import load_causal_lm

    if _device() == "cpu":
        dtype = "float32"  # half precision on CPU is slow and changes the log-probs
    return load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code).to(_device()).eval()


def sample_policy(name: str, path: str, rows: list[dict], sec) -> dict:
    """Rendered prompts, their token ids, and sec.samples_per_prompt completions per prompt for one policy."""
    from prefopt.generation import make_generator
    from prefopt.models import load_tokenizer

    tok = load_tokenizer(path, trust_remote_code=sec.trust_remote_code)
    rendered = [render_prompt(r["prompt"], tok) for r in rows]
    # Tokenized exactly as the generators do (add_special_tokens=True), so the log-probs are of what was sampled.
    prompt_ids = [tok(t, add_special_tokens=True)["input_ids"] for t in rendered]
    gen = make_generator(path, backend=sec.backend, batch_size=sec.batch_size, dtype=sec.dtype, seed=sec.seed)
    sampling = Sampling(n=sec.samples_per_prompt, temperature=sec.temperature, top_p=sec.top_p,
                        max_new_tokens=sec.max_new_tokens, seed=sec.seed)
    bar = tqdm(total=len(rows), desc=f"generate {name}", unit="prompt")

    def progress(done: int, tokens: int) -> None:  # prompts in the batch just finished
        bar.update(done)

    outs = gen.generate(rendered, sampling, progress=progress)
    bar.close()
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


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def table(policies: dict[str, dict]) -> str:
    """A markdown table, one row per policy; columns that are empty for every policy are left out."""
    cols = [(k, h) for k, h in COLUMNS if any(p.get(k) is not None for p in policies.values())]
    lines = ["| policy | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, p in policies.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(p.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


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
    ax2.set_xlabel("KL to baseline (nats, Monte-Carlo)")
    ax2.set_ylabel(key.replace("_", " "))
    ax2.set_title(f"{key.replace('_', ' ')} vs KL")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(ctx) -> dict:
    sec = ctx.section
    seed_everything(ctx.seed)
    policies = {n: ctx.resolve(ref) for n, ref in active_policies(ctx.cfg, sec.policies).items()}
    if not policies:
        raise ValueError("evaluate: no policy to evaluate (every stage named in evaluate.policies is off)")
    base = sec.baseline if sec.baseline in policies else None
    if base is None:
        print(f"[evaluate] baseline {sec.baseline!r} is not among the policies {list(policies)}: "
              "no win rates or KL", flush=True)
    rows = load_prompts(sec.prompts, sec.template, resolve=lambda p: ctx.resolve(p, model=False)).rows
    gold_fn = gold_scorer(ctx.cfg, sec.task)
    rm_ref = sec.reward_model
    use_rm = bool(rm_ref) and (not rm_ref.startswith("stage:") or ref_stage(rm_ref) in ctx.cfg.stages)

    # 1. Samples: every policy, same prompts, same seed.
    samples = {name: sample_policy(name, path, rows, sec) for name, path in policies.items()}
    for name, s in samples.items():
        write_json(ctx.dir / f"{name}.json", alpaca_rows(name, rows, s["completions"]))

    # 2. Log-probs at the sampling temperature: each policy on its own samples, the baseline on everyone's.
    T = sec.temperature if sec.temperature > 0 else 1.0  # greedy: no sampling distribution; report T=1 log-probs
    own, ref = {}, {}
    for name, path in policies.items():
        model = _load_lm(path, sec.dtype, sec.trust_remote_code)
        flat = _flat(samples[name])
        own[name] = M.response_logps(model, *flat, pad_id=samples[name]["pad_id"], temperature=T,
                                     batch_size=sec.batch_size, desc=f"log-probs {name}")
        if name == base:
            for other, s in samples.items():
                ref[other] = (own[name] if other == name else
                              M.response_logps(model, *_flat(s), pad_id=s["pad_id"], temperature=T,
                                               batch_size=sec.batch_size, desc=f"baseline log-probs {other}"))
        del model
        _free()

    # 3. Reward model and gold scores of every sample.
    rm, gold = {}, {}
    if use_rm:
        from prefopt.reward.score import load_scorer, reward_text, score_texts

        model, tok = load_scorer(ctx.resolve(rm_ref), sec.trust_remote_code)
        for name, s in samples.items():
            texts = [reward_text(p, c.text, tok.eos_token) for p, comps in zip(s["rendered"], s["completions"])
                     for c in comps]
            bar = tqdm(total=len(texts), desc=f"reward {name}", unit="seq", leave=False)
            rm[name] = _nest(score_texts(model, tok, texts, sec.batch_size, sec.rm_max_length, progress=bar), s)
            bar.close()
        del model
        _free()
    if gold_fn is not None:
        for name, s in samples.items():
            gold[name] = [[gold_fn(p, c.text) for c in comps] for p, comps in zip(s["rendered"], s["completions"])]

    # 4. Optional order-swapped judge: each policy's first sample against the baseline's, per prompt.
    judged = {}
    if sec.judge.model and base is not None:
        from prefopt.evaluate.judge import LMJudge, judge_pairs
        from prefopt.models import load_tokenizer

        jpath = ctx.resolve(sec.judge.model)
        judge = LMJudge(_load_lm(jpath, sec.dtype, sec.trust_remote_code),
                        load_tokenizer(jpath, trust_remote_code=sec.trust_remote_code),
                        chat=sec.judge.chat, batch_size=sec.judge.batch_size)
        k = min(sec.judge.max_prompts, len(rows))
        instructions = [alpaca_judge_instruction(r) for r in rows[:k]]
        for name in tqdm([n for n in samples if n != base], desc="judge", unit="policy"):
            judged[name] = judge_pairs(judge.prob_a, instructions,
                                       [c[0].text for c in samples[name]["completions"][:k]],
                                       [c[0].text for c in samples[base]["completions"][:k]])
        del judge
        _free()

    # 5. Figures per policy.
    figures: dict[str, dict] = {}
    for name, s in samples.items():
        comps = [c for cs in s["completions"] for c in cs]
        f = {
            "model": policies[name],
            "gold_score": M.mean_score(gold[name]) if name in gold else None,
            "rm_score": M.mean_score(rm[name]) if name in rm else None,
            "win_rate_vs_sft": M.win_rate(rm[name], rm[base]) if base and name in rm else None,
            "win_rate_vs_sft_gold": M.win_rate(gold[name], gold[base]) if base and name in gold else None,
            "kl_to_sft": M.sequence_kl(own[name], ref[name]) if name in ref else None,
            "length": M.mean_length([len(c.token_ids) for c in comps]),
            "finished": sum(c.finished for c in comps) / len(comps),
            "logp": sum(own[name]) / len(own[name]),
        }
        if name in judged:
            f["judge_win_rate"] = judged[name]["win_rate"]
            f["judge_order_disagreement"] = judged[name]["disagreement"]
        figures[name] = f
        ctx.tracker.log({f"{name}/{k}": v for k, v in f.items() if isinstance(v, (int, float))})
        write_jsonl(ctx.dir / f"samples_{name}.jsonl", _sample_rows(name, rows, s, gold, rm, own, ref))

    md = table(figures)
    atomic_write(ctx.dir / "table.md", md)  # printed by `prefopt run` / `prefopt evaluate` once the stage is done
    if plot(figures, ctx.dir / "evaluate.png"):
        ctx.tracker.log_image("evaluate", ctx.dir / "evaluate.png")
    return {
        "policies": figures,
        "baseline": base,
        "num_prompts": len(rows),
        "samples_per_prompt": sec.samples_per_prompt,
        "temperature": sec.temperature,
        "seed": sec.seed,
    }


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
                "logp": own[name][i], "ref_logp": ref[name][i] if name in ref else None,
            }
            i += 1
