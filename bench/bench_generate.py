"""Generation speed of the transformers backend: batched against a naive loop, and its parts against what they
replaced.

    OMP_NUM_THREADS=2 python bench/bench_generate.py                      # a tiny Llama built here
    python bench/bench_generate.py --model runs/quickstart/sft/model --prompts 128 --n 4 --batch-size 32
    python bench/bench_generate.py --model runs/quickstart/sft/model --prompts 256 --n 8 --max-new-tokens 16 \
        --batch-size 64 --compare-prefill 2

Batched: prompts sorted by length, `batch_size` prompts per `model.generate` call, each sampled n times
(one tokenization, one padded batch, the prompts' shared tokens prefilled once, the KV cache). Naive: one
`generate` call per prompt and per sample, as a first attempt would write it. Both sample the same number of
tokens at most; EOS can end either early, so speeds are compared in tokens/s as well as prompts/s. Run by hand,
not by the tests.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def tiny_model(out: Path, hidden: int, layers: int) -> str:
    from prefopt.models.loading import build_tiny_llama, build_tokenizer, save_model
    from prefopt.dist.process import seed_everything

    seed_everything(0)
    texts = ["Below is an instruction that describes a task. Sort the numbers 3 1 2 in ascending order. 1 2 3"] * 50
    tok = build_tokenizer(texts, vocab_size=300)
    model = build_tiny_llama(tok, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=2 * hidden, max_position_embeddings=512)
    return str(save_model(model, tok, out / "model"))


def timed(fn) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="a checkpoint folder (default: build a tiny Llama)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--compare-cache", type=int, default=0, metavar="REPEATS",
                   help="instead: the batched path with prefopt's preallocated KV cache against transformers' own "
                        "(torch.cat each step), alternated REPEATS times; the samples must be identical")
    p.add_argument("--compare-prefill", type=int, default=0, metavar="REPEATS",
                   help="instead: the batched path with the prompts prefilled once (generation.prefill: a prefix "
                        "tree on SDPA / eager) against transformers' own prefill (each prompt n times), alternated "
                        "REPEATS times; the samples must be identical")
    args = p.parse_args(argv)
    if args.compare_cache:
        return compare_cache(args)
    if args.compare_prefill:
        return compare_prefill(args)

    from prefopt.generation import Sampling
    from prefopt.generation.hf import TransformersGenerator

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_model(Path(tmp), args.hidden, args.layers)
        prompts = prompts_of(args.prompts)
        batched = TransformersGenerator(path, batch_size=args.batch_size)
        naive = TransformersGenerator(batched.model, batched.tokenizer, batch_size=1)
        sampling = Sampling(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
        batched.generate(prompts[:2], sampling)  # warm-up

        t_b, out_b = timed(lambda: batched.generate(prompts, sampling))
        one = Sampling(n=1, temperature=1.0, max_new_tokens=args.max_new_tokens)
        t_n, out_n = timed(lambda: [naive.generate([q], Sampling(**{**one.to_dict(), "seed": j}))[0][0]
                                    for q in prompts for j in range(args.n)])

    tok_b = sum(len(c.token_ids) for o in out_b for c in o)
    tok_n = sum(len(c.token_ids) for c in out_n)
    print(f"{args.prompts} prompts x {args.n} samples, max_new_tokens={args.max_new_tokens}, model={path}")
    print(f"{'':8s} {'seconds':>9s} {'prompts/s':>10s} {'tokens/s':>10s}")
    for name, t, tok in (("batched", t_b, tok_b), ("naive", t_n, tok_n)):
        print(f"{name:8s} {t:9.2f} {args.prompts / t:10.2f} {tok / t:10.1f}")
    print(f"speed-up (tokens/s): {(tok_b / t_b) / (tok_n / t_n):.1f}x")
    return 0


def prompts_of(n: int) -> list[str]:
    from prefopt.data.templates import alpaca_prompt

    return [alpaca_prompt(f"Sort the numbers {' '.join(str((i * 7 + k) % 10) for k in range(3 + i % 5))}.")
            for i in range(n)]


def alternate(args, repeats: int, variants: dict) -> int:
    """`variants` {name: (generator, setup)}: each generates the same prompts under the same seed, `setup()` run
    before each of its turns, the variants alternated `repeats` times (a machine whose speed drifts slows them
    alike). Prints each turn's seconds and the ratio of the second variant to the first; exit 1 if the samples
    differ."""
    from prefopt.generation import Sampling

    prompts = prompts_of(args.prompts)
    sampling = Sampling(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    times: dict[str, list[float]] = {name: [] for name in variants}
    outs = {}
    for name, (gen, setup) in variants.items():  # warm-up
        setup()
        gen.generate(prompts[:2], sampling)
    for _ in range(repeats):
        for name, (gen, setup) in variants.items():
            setup()
            t, out = timed(lambda: gen.generate(prompts, sampling))
            times[name].append(t)
            outs[name] = [[c.token_ids for c in o] for o in out]
    first, second = list(variants)
    same = outs[first] == outs[second]
    print(f"{args.prompts} prompts x {args.n} samples, max_new_tokens={args.max_new_tokens}, batch "
          f"{args.batch_size}")
    for name, ts in times.items():
        print(f"{name:13s} " + " / ".join(f"{t:.2f}" for t in ts) + " s")
    print(f"{second} / {first}: x{sum(times[second]) / sum(times[first]):.2f}; identical samples: {same}")
    return 0 if same else 1


def compare_cache(args) -> int:
    """generation.kvcache's cache against transformers' DynamicCache on the same batches and seeds."""
    from prefopt.generation import hf

    real = hf.preallocated_cache

    def use(cache):
        return lambda: setattr(hf, "preallocated_cache", cache)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_model(Path(tmp), args.hidden, args.layers)
        gen = hf.TransformersGenerator(path, batch_size=args.batch_size, share_prompts=False)
        print(f"model={path}")
        try:
            return alternate(args, args.compare_cache, {"transformers": (gen, use(lambda model, capacity: None)),
                                                        "preallocated": (gen, use(real))})
        finally:
            hf.preallocated_cache = real


def compare_prefill(args) -> int:
    """generation.prefill against transformers' own prefill (num_return_sequences), on one model."""
    from prefopt.generation import hf, prefill

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_model(Path(tmp), args.hidden, args.layers)
        own = hf.TransformersGenerator(path, batch_size=args.batch_size, share_prompts=False)
        ours = hf.TransformersGenerator(own.model, own.tokenizer, batch_size=args.batch_size)
        how = "a prefix tree" if prefill.can_tree(own.model) else "each prompt once"
        print(f"model={path}; prefilled once: {how}")
        return alternate(args, args.compare_prefill, {"transformers": (own, lambda: None),
                                                      "prefilled": (ours, lambda: None)})


if __name__ == "__main__":
    sys.exit(main())
