"""The evaluate stage's sample sets: drawing them (each under its own seed), their shapes (nested per prompt or flat,
prompt-major), the checkpoints an aligner saved, and the rows written out (AlpacaEval outputs, samples JSONL)."""

from __future__ import annotations

import gc
from pathlib import Path

from tqdm.auto import tqdm

from prefopt.data.templates import encode_many, prompt_text, render_prompt
from prefopt.generation.base import Sampling, derive_seed
from prefopt.io import content_hash


def sampling_seed(eval_seed: int, run_seed: int, name: str) -> int:
    """The seed sample set `name` is drawn under: (evaluate.seed, experiment seed, name) hashed, so no two sets share
    random numbers and a set redrawn later is drawn alike."""
    return derive_seed(eval_seed, run_seed, name)


def free_memory():
    """Return a dropped model's GPU memory to the pool before the next one loads. On a CPU it does nothing: the
    memory is the process's either way, and a full `gc.collect` over the stage's samples cost 0.19 s a call
    (8.5 s of the quickstart's evaluate, 44 calls)."""
    import torch

    if torch.cuda.is_available():
        gc.collect()  # a model in a reference cycle holds its tensors until collected
        torch.cuda.empty_cache()


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def scoring_batch_size(sec) -> int:
    """Sequences per log-prob and reward-model pass: `logprob_batch_size`, else generation's `batch_size` on a GPU
    (the memory plan's figure) and 4 x it on CPU, where a no-grad pass of a small model is bound by per-batch
    overhead: 256 sequences ran 1.9x faster than 64 on the quickstart's models. A sequence's value changes only by
    float rounding, and only where its batch's width changes (the attention sums in another order): the quickstart's
    table came out identical, 152 of its 25,600 per-sample values moved by at most 3.8e-6."""
    return sec.logprob_batch_size or (sec.batch_size if device() == "cuda" else 4 * sec.batch_size)


def load_lm(path: str, dtype: str, trust_remote_code: bool):
    from prefopt.models.loading import load_causal_lm

    if device() == "cpu":
        dtype = "float32"  # half precision on CPU is slow and changes the log-probs
    return load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device()).eval()


def sample_policy(name: str, path: str, rows: list[dict], sec, n: int | None = None, seed: int | None = None) -> dict:
    """Rendered prompts, their token ids, and n (default sec.samples_per_prompt) completions per prompt."""
    from prefopt.generation import make_generator
    from prefopt.models.loading import load_tokenizer

    tok = load_tokenizer(path, trust_remote_code=sec.trust_remote_code)
    rendered = [render_prompt(r["prompt"], tok) for r in rows]
    # Tokenized exactly as the generators do (one BOS, `encode`), so the log-probs are of what was sampled.
    prompt_ids = encode_many(rendered, tok)
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
    free_memory()
    return {"rendered": rendered, "prompt_ids": prompt_ids, "completions": outs, "pad_id": tok.pad_token_id or 0,
            "vocab": vocab_digest(tok)}


def vocab_digest(tokenizer) -> str:
    """What token ids mean to this tokenizer: one model's log-probs of another's token ids (the KL to the
    baseline) are log-probs of other text unless the two digests agree."""
    return content_hash(sorted(tokenizer.get_vocab().items()))


def flat(s: dict) -> tuple[list, list]:
    """(prompt ids, response ids) per sample, prompt-major."""
    pids, rids = [], []
    for p, comps in zip(s["prompt_ids"], s["completions"]):
        for c in comps:
            pids.append(p)
            rids.append(list(c.token_ids))
    return pids, rids


def nest(flat: list[float], samples: dict) -> list[list[float]]:
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


def lengths(s: dict) -> list[list[int]]:
    return [[len(c.token_ids) for c in cs] for cs in s["completions"]]


def token_ids(s: dict) -> list[list[tuple]]:
    return [[tuple(c.token_ids) for c in cs] for cs in s["completions"]]


def count(s: dict, k: int) -> int:
    """Samples in the first k prompts of a sample set (flat index bound)."""
    return sum(len(c) for c in s["completions"][:k])


def head(nested, k: int):
    return None if nested is None else nested[:k]


def subset(s: dict, k: int) -> dict:
    return {**s, "rendered": s["rendered"][:k], "prompt_ids": s["prompt_ids"][:k], "completions": s["completions"][:k]}


def alpaca_judge_instruction(row: dict) -> str:
    """What the judge reads as the instruction: the original instruction (and input), else the prompt text."""
    meta = row.get("meta") or {}
    if meta.get("instruction"):
        return meta["instruction"] + (f"\n\n{meta['input']}" if meta.get("input") else "")
    return prompt_text(row["prompt"])


def sample_rows(name, rows, s, gold, rm, own, ref):
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
