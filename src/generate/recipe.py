"""The `generate` stage: sample candidates for every prompt from a policy, in resumable shards.

    prefopt generate experiments/quickstart.yaml
    prefopt generate experiments/quickstart.yaml --generate.backend=transformers --generate.n=8

Setup: load the prompts (any format the loaders read), render each for the policy (Alpaca text, or the
tokenizer's chat template), pick the backend (vLLM where it can run, else transformers).
Loop: prompts are cut into shards of `shard_size`; a shard already on disk is kept, the others are sampled and
written (atomically) as `shard-00000.jsonl`, ... One row per prompt:

    {"prompt_id", "prompt", "candidates": [str], "candidate_lengths": [tokens], "finished": [bool],
     "sampling": {...}, "seed", "generator": {"path", "sha256", "backend"},
     "meta": {"instruction", "input", "messages" (a chat prompt's turns)}}

`seed` is the configured seed (an int), or with `seeds` the list of seeds, one per candidate in order.
Resume: a shard's sampling is seeded from (configured seed, experiment seed and round, shard index), never from
what ran before, so a killed run redone gives exactly the candidates it would have given: none lost, none
duplicated, finished shards untouched.
Preemption: SIGTERM / SIGINT / SIGUSR1 drop the shard being sampled at once (nothing of it is on disk: shards are
written whole, by rename) or stop before the next one, in this process and in its data-parallel workers; the stage
ends with one line and exit code 143 (prefopt.runtime.faults.ShardsPreempted), and the rerun resumes at the dropped shard.

The SimPO on-policy recipe (Meng et al., 2024, Sec. 3 / their on-policy data scripts): one sample per seed,
    generate: {seeds: [13, 21, 42, 79, 100], temperature: 0.8, top_p: 0.95, drop_identical: true}
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

from prefopt.runtime import faults
from prefopt.data.counts import note
from prefopt.data.loaders import load_prompts
from prefopt.data.templates import render_prompt
from prefopt.generation.base import Completion, Sampling, derive_seed, generate_many
from prefopt.generation.factory import make_generator, resolve_backend
from prefopt.dist.gpus import data_parallel_size, free_gpu_memory, run_workers
from prefopt.io import read_jsonl, weights_sha256, write_jsonl


def shard_path(d: Path, k: int) -> Path:
    return Path(d) / f"shard-{k:05d}.jsonl"


def shard_samplings(sec, base_seed: int, shard: int) -> list[Sampling]:
    """The generate calls for one shard: one call with n samples, or (SimPO) one call with one sample per seed."""
    common = dict(temperature=sec.temperature, top_p=sec.top_p, max_new_tokens=sec.max_new_tokens)
    if sec.seeds:
        return [Sampling(n=1, seed=derive_seed(s, base_seed, shard), **common) for s in sec.seeds]
    return [Sampling(n=sec.n, seed=derive_seed(sec.seed, base_seed, shard), **common)]


def all_identical(candidates: list[str]) -> bool:
    """No preference can be read from a prompt whose candidates are all the same text (needs two or more)."""
    return len(candidates) > 1 and len(set(candidates)) == 1


def unique_prompts(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the first row of each prompt_id: a prompt listed twice would give two rows with one id downstream."""
    seen, out = set(), []
    for r in rows:
        if r["prompt_id"] not in seen:
            seen.add(r["prompt_id"])
            out.append(r)
    return out, len(rows) - len(out)


def finished_shard(path: Path, expected_ids: list[str], sha256: str) -> list[dict] | None:
    """A shard written by an earlier run of this config, or None when it must be (re)done: missing, or made
    from other prompts or other weights. Files are written atomically, so one that exists is whole."""
    if not path.exists():
        return None
    rows = read_jsonl(path)
    ids = iter(expected_ids)
    in_order = all(any(r["prompt_id"] == e for e in ids) for r in rows)  # a subsequence: drops allowed
    if not in_order or any(r["generator"]["sha256"] != sha256 for r in rows):
        return None
    return rows


def row_meta(prompt: dict) -> dict:
    """A shard row's `meta`: the loader's (instruction, input), plus the chat turns of a `template: chat` prompt,
    which the rendered `prompt` no longer shows: a reward model that reads its own chat template needs them
    (`score.rm_format`, `data.templates.prompt_messages`)."""
    meta = dict(prompt.get("meta") or {})
    if isinstance(prompt["prompt"], list):
        meta["messages"] = prompt["prompt"]
    return meta


def make_rows(prompts: list[dict], rendered: list[str], outputs: list[list[list[Completion]]], sec,
              samplings: list[Sampling], generator: dict) -> list[dict]:
    """Rows of one shard from each generate call's completions (calls in order: their candidates concatenate)."""
    sampling = {"n": sum(s.n for s in samplings), "temperature": sec.temperature, "top_p": sec.top_p,
                "max_new_tokens": sec.max_new_tokens, "shard_seeds": [s.seed for s in samplings]}
    sampling.update({"seeds": list(sec.seeds)} if sec.seeds else {"seed": sec.seed})
    rows = []
    for i, (p, text) in enumerate(zip(prompts, rendered)):
        comps = [c for call in outputs for c in call[i]]
        rows.append({
            "prompt_id": p["prompt_id"],
            "prompt": text,
            "candidates": [c.text for c in comps],
            "candidate_lengths": [len(c.token_ids) for c in comps],
            "finished": [c.finished for c in comps],
            "sampling": sampling,
            "seed": list(sec.seeds) if sec.seeds else sec.seed,
            "generator": generator,
            "meta": row_meta(p),
        })
    return rows


def build_generator(model_path: str, backend: str, sec):
    return make_generator(model_path, backend, batch_size=sec.batch_size, dtype=sec.dtype,
                          tensor_parallel_size=sec.tensor_parallel_size,
                          gpu_memory_utilization=sec.gpu_memory_utilization, seed=sec.seed,
                          batch_invariant=sec.batch_invariant)


def release(generator) -> None:
    """Free the generator's GPU memory before the next stage loads a model in this process: vLLM's close (sleep,
    delete, its distributed cleanup), then the CUDA cache. An engine left alive held most of the GPU while `score`
    loaded the reward model beside it."""
    close = getattr(generator, "close", None)
    if close is not None:
        close()
    del generator
    free_gpu_memory()


def sample_shard(generator, k: int, chunk: list[dict], texts: list[str], sec, base_seed: int, generator_info: dict,
                 path: Path, progress=None, signals: faults.ShardSignals | None = None) -> list[dict]:
    """Sample one shard's prompts and write its rows (atomically): the same rows whichever process does it. A
    signal while sampling raises faults.ShardDropped (`signals`); one while writing lets the write finish."""
    samplings = shard_samplings(sec, base_seed, k)
    with signals.sampling() if signals is not None else nullcontext():
        outputs = generate_many(generator, texts, samplings, progress=progress)  # vLLM: one call for all seeds
    rows = make_rows(chunk, texts, outputs, sec, samplings, generator_info)
    if sec.drop_identical:
        rows = [r for r in rows if not all_identical(r["candidates"])]
    write_jsonl(path, rows)
    return rows


def preempted(d: Path, n_shards: int, signals: faults.ShardSignals, dropped: bool) -> faults.ShardsPreempted:
    """The stage's line: how many shards are on disk (each whole) and where the rerun starts."""
    done = {k for k in range(n_shards) if shard_path(d, k).exists()}
    todo = [k for k in range(n_shards) if k not in done]
    return faults.ShardsPreempted("generate", signals.signum, len(done), n_shards, dropped, todo[0] if todo else None)


@faults.handled(faults.ShardSignals)
def run(ctx, signals: faults.ShardSignals) -> dict:
    """Setup (backend, prompts, shards left to do), the data-parallel workers when there are several engines, the
    shards sampled here, and the summary. From loading to the last shard, a signal drops the shard in progress
    (or stops before the next one)."""
    from prefopt.models.loading import load_tokenizer

    sec = ctx.section
    backend = resolve_backend(sec.backend)  # a vLLM that cannot run fails here, before any work
    model_path = ctx.resolve(sec.model)
    tokenizer = load_tokenizer(model_path)
    loaded = load_prompts(sec.prompts, sec.template, resolve=lambda p: ctx.resolve(p, model=False),
                          tokenizer=tokenizer)
    prompts, duplicates = unique_prompts(loaded.rows)
    rendered = [render_prompt(p["prompt"], tokenizer) for p in prompts]
    generator_info = {"path": str(model_path), "sha256": weights_sha256(model_path), "backend": backend,
                      "batch_invariant": False}
    n_shards = (len(prompts) + sec.shard_size - 1) // sec.shard_size

    def shard(k: int) -> tuple[list[dict], list[str], Path]:
        return (prompts[k * sec.shard_size:(k + 1) * sec.shard_size],
                rendered[k * sec.shard_size:(k + 1) * sec.shard_size], shard_path(ctx.dir, k))

    todo = [k for k in range(n_shards)
            if finished_shard(shard(k)[2], [p["prompt_id"] for p in shard(k)[0]], generator_info["sha256"]) is None]
    workers = min(data_parallel_size(sec.data_parallel, sec.tensor_parallel_size), len(todo))
    dp_seconds = 0.0
    if workers > 1:  # one process per engine, each its share of the shards; the loop below then finds them done
        dp_seconds = generate_data_parallel(ctx, signals, model_path, backend, generator_info,
                                            {k: shard(k) for k in todo}, workers, n_shards)
    totals = sample_shards(ctx, signals, model_path, backend, generator_info, shard, n_shards, todo, len(prompts))
    gen_seconds = totals["seconds"] + dp_seconds

    ctx.tracker.log_artifact(sorted(ctx.dir.glob("shard-*.jsonl")), name=f"{ctx.cfg.name}-candidates-r{ctx.round}",
                             type_="dataset")
    note("repeated prompts sampled once", duplicates)
    note("prompts dropped: all candidates identical (drop_identical)", totals["dropped"])
    return {
        "prompts": len(prompts),
        "rows": totals["rows"],
        "candidates": totals["candidates"],
        "dropped_identical": totals["dropped"],
        "duplicate_prompts": duplicates,
        "skipped_bad_rows": loaded.skipped,
        "tokens": totals["tokens"],
        "finished_fraction": round(totals["finished"] / max(totals["candidates"], 1), 4),
        "prompts_per_second": round(totals["new_prompts"] / gen_seconds, 3) if gen_seconds else None,
        "tokens_per_second": round(totals["new_tokens"] / gen_seconds, 1) if gen_seconds else None,
        "backend": backend,
        "generator": generator_info,
        "shards": n_shards,
        "resumed_shards": totals["resumed"],
        "data_parallel": max(workers, 1),
    }


def generate_data_parallel(ctx, signals: faults.ShardSignals, model_path: str, backend: str, generator_info: dict,
                           shards: dict, workers: int, n_shards: int) -> float:
    """`shards` (index -> (prompts, rendered, path)) sampled by `workers` processes, one engine each; the seconds it
    took."""
    from prefopt.dist.gpus import WorkerFailed

    sec = ctx.section
    t0 = time.time()
    job = {"worker": "prefopt.generate.recipe:generate_worker", "model_path": model_path, "backend": backend,
           "sec": sec, "base_seed": ctx.seed, "generator_info": generator_info, "shards": shards}
    try:
        run_workers(ctx.dir, job, workers, sec.tensor_parallel_size, "generation", "generate.data_parallel")
    except WorkerFailed:
        if signals.signum:  # the workers got the signal too (passed on by ShardSignals) and dropped their shard
            raise preempted(ctx.dir, n_shards, signals, dropped=True) from None
        raise
    return time.time() - t0


def sample_shards(ctx, signals: faults.ShardSignals, model_path: str, backend: str, generator_info: dict, shard,
                  n_shards: int, todo: list[int], n_prompts: int) -> dict:
    """Every shard in order: one finished already (resumed, or written by a data-parallel worker of this run) is
    counted, one left is sampled here (the engine built at the first). Returns the totals over all shards, and this
    run's new prompts, new tokens and sampling seconds."""
    from tqdm.auto import tqdm

    sec = ctx.section
    passes = len(sec.seeds) or 1  # generate calls per shard
    generator = None  # built only if some shard is left to do: loading a model for nothing is slow on vLLM
    totals = {"rows": 0, "candidates": 0, "tokens": 0, "dropped": 0, "finished": 0, "new_prompts": 0,
              "new_tokens": 0, "resumed": 0, "seconds": 0.0}
    # With `seeds`, each prompt is sampled once per seed: the bar counts (prompt, seed) passes.
    bar = tqdm(total=n_prompts * passes, desc="generate", unit="prompt" if passes == 1 else "prompt·seed",
               dynamic_ncols=True)
    speed = {"start": time.time(), "passes": 0}  # start reset once the model is loaded: sampling speeds are shown

    def progress(done: int, tokens: int) -> None:
        totals["new_tokens"] += tokens
        speed["passes"] += done
        bar.update(done)
        elapsed = max(time.time() - speed["start"], 1e-9)
        bar.set_postfix({"prompts/s": f"{speed['passes'] / passes / elapsed:.2f}",
                         "tokens/s": f"{totals['new_tokens'] / elapsed:.1f}"})

    try:
        for k in range(n_shards):
            chunk, texts, path = shard(k)
            rows = finished_shard(path, [p["prompt_id"] for p in chunk], generator_info["sha256"])
            if rows is not None and k in todo:  # written by a data-parallel worker: this run's work
                totals["new_prompts"] += len(chunk)
                totals["new_tokens"] += sum(sum(r["candidate_lengths"]) for r in rows)
                generator_info["batch_invariant"] = rows[0]["generator"]["batch_invariant"] if rows else False
                bar.update(len(chunk) * passes)
            elif rows is not None:
                totals["resumed"] += 1
                bar.update(len(chunk) * passes)  # resumed: on the bar, not in this run's speeds
            else:
                if signals.signum:  # came while a shard was written or the model loaded: stop before this one
                    raise preempted(ctx.dir, n_shards, signals, dropped=False)
                if generator is None:
                    generator = build_generator(model_path, backend, sec)
                    # what the engine really runs (vLLM's mode may also come from the environment), not what was
                    # asked
                    generator_info["batch_invariant"] = bool(getattr(generator, "batch_invariant", False))
                    speed["start"] = time.time()
                t0 = time.time()
                try:
                    rows = sample_shard(generator, k, chunk, texts, sec, ctx.seed, generator_info, path, progress,
                                        signals)
                except faults.ShardDropped:
                    raise preempted(ctx.dir, n_shards, signals, dropped=True) from None
                totals["seconds"] += time.time() - t0
                totals["new_prompts"] += len(chunk)
                ctx.tracker.log({"generate/prompts_done": min((k + 1) * sec.shard_size, n_prompts),
                                 "generate/tokens_per_second": totals["new_tokens"] / max(totals["seconds"], 1e-9)},
                                step=k)
            totals["rows"] += len(rows)
            totals["dropped"] += len(chunk) - len(rows)
            totals["candidates"] += sum(len(r["candidates"]) for r in rows)
            totals["tokens"] += sum(sum(r["candidate_lengths"]) for r in rows)
            totals["finished"] += sum(sum(r["finished"]) for r in rows)
    finally:
        bar.close()  # before the stage's line, if a signal ends it
        if generator is not None:
            release(generator)
    return totals


# ------------------------------------------------------------------------------- data parallel over a node's GPUs


def generate_worker(job: dict, rank: int, world: int) -> None:
    """One data-parallel worker (`prefopt.dist.gpus.run_workers`): its engine, its shards, then the engine released."""
    mine = sorted(job["shards"])[rank::world]
    sec, info = job["sec"], dict(job["generator_info"])
    with faults.ShardSignals(f"generate worker {rank}") as signals:  # the stage passes its signal on to us
        generator = build_generator(job["model_path"], job["backend"], sec)
        info["batch_invariant"] = bool(getattr(generator, "batch_invariant", False))
        for i, k in enumerate(mine):
            chunk, texts, path = job["shards"][k]
            try:
                sample_shard(generator, k, chunk, texts, sec, job["base_seed"], info, path, signals=signals)
            except faults.ShardDropped:
                raise faults.ShardsPreempted(f"generate worker {rank}", signals.signum, i, len(mine), True, k) \
                    from None
            print(f"[prefopt] generate worker {rank}/{world}: shard {k} written", flush=True)
            if signals.signum and i + 1 < len(mine):
                raise faults.ShardsPreempted(f"generate worker {rank}", signals.signum, i + 1, len(mine), False,
                                             mine[i + 1])
        release(generator)
