"""Candidates per second of each generation backend on the same model and prompts: transformers and vLLM.

    OMP_NUM_THREADS=2 python bench/bench_backends.py                              # a tiny Llama built here (CPU)
    python bench/bench_backends.py --model runs/x/sft/model --prompts 512 --seeds 13,21,42,79,100 --max-new-tokens 512

Each backend samples the same prompts the way the `generate` stage does: with `--seeds`, one candidate per seed
(the SimPO recipe; vLLM gets every (seed, prompt) request in one engine call), else `--n` candidates per prompt
under one seed. A backend that cannot run here (vLLM without CUDA) is listed with the reason. The time excludes
building the engine; one warm-up call on two prompts runs first. Run by hand on a GPU machine, not by the tests.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_generate import tiny_model  # the same tiny Llama the transformers-only bench builds


def bench(backend: str, model: str, prompts: list[str], samplings, args) -> dict:
    from prefopt.generation import make_generator
    from prefopt.generation.base import generate_many
    from prefopt.generation.factory import vllm_unavailable_reason

    if backend == "vllm" and vllm_unavailable_reason():
        return {"backend": backend, "skipped": vllm_unavailable_reason()}
    t0 = time.perf_counter()
    gen = make_generator(model, backend, batch_size=args.batch_size, dtype=args.dtype,
                         batch_invariant=args.batch_invariant)
    build = time.perf_counter() - t0
    generate_many(gen, prompts[:2], samplings)  # warm-up (kernels, caches)
    t0 = time.perf_counter()
    out = generate_many(gen, prompts, samplings)
    wall = time.perf_counter() - t0
    cands = [c for per in out for comps in per for c in comps]
    tokens = sum(len(c.token_ids) for c in cands)
    if hasattr(gen, "close"):
        gen.close()
    return {"backend": backend, "build_seconds": round(build, 1), "seconds": round(wall, 2),
            "candidates": len(cands), "candidates_per_second": round(len(cands) / wall, 2),
            "tokens_per_second": round(tokens / wall, 1), "finished": round(sum(c.finished for c in cands) / len(cands), 3),
            "batch_invariant": getattr(gen, "batch_invariant", None)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="checkpoint folder (default: a tiny Llama built here)")
    p.add_argument("--prompts", type=int, default=64, help="prompts (Alpaca-rendered, from ../shared/data)")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt when --seeds is empty")
    p.add_argument("--seeds", default="", help="comma-separated seeds: one candidate per seed (SimPO recipe)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="prompts per transformers generate call")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--batch-invariant", action="store_true", help="vLLM's batch-invariant mode (same seed, same "
                   "candidates whatever the batch; vLLM docs: beta, compute capability >= 8.0)")
    p.add_argument("--backends", default="transformers,vllm")
    args = p.parse_args(argv)

    from prefopt.data.templates import alpaca_prompt
    from prefopt.generation import Sampling

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "llama-factory" / "alpaca_en_demo.json"
    rows = json.loads(data.read_text()) if data.exists() else [
        {"instruction": f"Sort the numbers {i % 7} {i % 5} {i % 3}.", "input": ""} for i in range(args.prompts)]
    prompts = [alpaca_prompt(r["instruction"], r.get("input", "")) for r in rows[: args.prompts]]
    common = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    samplings = ([Sampling(n=1, seed=s, **common) for s in seeds] if seeds else [Sampling(n=args.n, seed=0, **common)])
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp), hidden=128, layers=2)
        results = [bench(b, model, prompts, samplings, args) for b in args.backends.split(",")]
    print(f"\n{len(prompts)} prompts x {len(seeds) or args.n} candidates, max {args.max_new_tokens} new tokens, "
          f"T {args.temperature}, top-p {args.top_p}, model {args.model or 'tiny Llama (built here)'}")
    print("| backend | candidates/s | tokens/s | seconds | finished | batch-invariant |\n|---|---|---|---|---|---|")
    for r in results:
        if "skipped" in r:
            print(f"| {r['backend']} | not run: {r['skipped']} | | | | |")
        else:
            print(f"| {r['backend']} | {r['candidates_per_second']} | {r['tokens_per_second']} | {r['seconds']} | "
                  f"{r['finished']} | {r['batch_invariant']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
