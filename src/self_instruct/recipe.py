"""The `self_instruct` stage: grow instruction data from seed tasks with a language model (self-instruct, Wang et
al. 2022; the method behind Stanford Alpaca's 52K).

    prefopt self_instruct experiments/self_instruct.yaml --self_instruct.model=/models/Llama-3.1-8B
    prefopt sft experiments/self_instruct.yaml          # sft.dataset.path: stage:self_instruct/data.json

Setup: read the seed tasks (Alpaca format; Stanford's seed_tasks.jsonl), put their instructions in the ROUGE-L
pool, pick the backend (vLLM where it can run, else transformers).
Loop, one batch at a time until `num_instructions` tasks are accepted or `max_batches` batches are done:
  1. for each of `batch_size` prompts, sample `prompt_tasks` examples (up to `prompt_generated` of them from the
     accepted tasks, the rest from the seeds) and write the prompt (prompt.py);
  2. generate one completion per prompt (prefopt.generation: vLLM or transformers);
  3. parse each completion into tasks; drop the pieces that do not parse, then the tasks a filter rejects
     (filters.py), last those too similar to the pool; each accepted task joins the pool at once, so two near
     copies in one batch do not both get in;
  4. append the batch as one line of `batches.jsonl` (accepted tasks, skip counts, examples).
Save: `data.json`, an Alpaca JSON array [{instruction, input, output}] that the `sft` stage reads.

Resume: a batch's examples and sampling are seeded from (seed, experiment seed, batch index), never from what ran
before, and the pool is rebuilt from `batches.jsonl`; a line cut short by a kill is discarded. A killed run thus
continues with the pool it had and writes exactly what an uninterrupted run would: no duplicates, none lost.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

from prefopt.config import ConfigError
from prefopt.data.errors import DataError
from prefopt.data.loaders import load_sft
from prefopt.generation.base import Sampling, derive_seed
from prefopt.generation.factory import make_generator, resolve_backend
from prefopt.self_instruct.filters import SimilarityPool, reject_reason
from prefopt.self_instruct.prompt import encode_prompt, parse_completion
from prefopt.stage import write_json
from prefopt.io import weights_sha256

EXAMPLE_CHARS = 300  # an example in the summary is cut here: enough to see what went wrong


def load_seed_tasks(spec, resolve=None) -> tuple[list[dict], dict]:
    """Seed tasks as {instruction, input, output}, and what was skipped reading them (count and examples)."""
    loaded = load_sft(spec, "alpaca", resolve=resolve)
    tasks = [{"instruction": r["meta"]["instruction"], "input": r["meta"]["input"], "output": r["completion"]}
             for r in loaded.rows]
    return tasks, {"rows": len(tasks), "skipped": loaded.skipped, "skip_examples": loaded.skipped_reasons[:5]}


def sample_examples(rng: random.Random, seeds: list[dict], generated: list[dict], k: int,
                    max_generated: int) -> list[dict]:
    """k example tasks: up to `max_generated` of the model's own, the rest seeds, in random order (self-instruct)."""
    g = min(max_generated, len(generated))
    picked = rng.sample(generated, g) + rng.sample(seeds, k - g)
    rng.shuffle(picked)
    return picked


class BatchLog:
    """`batches.jsonl`: one line per finished batch, appended in one write and fsync'd; a line cut short by a kill
    (no newline, or not JSON) and anything after it are cut off when the log is opened."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = []
        if not self.path.exists():
            return
        good = 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("cut short")
                    rec = json.loads(line)
                    if rec.get("batch") != len(self.records):
                        raise ValueError("out of order")
                except ValueError:
                    break
                self.records.append(rec)
                good += len(line)
        if good < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.records = []


def judge_batch(completions, sec, pool: SimilarityPool) -> tuple[list[dict], Counter, dict[str, list]]:
    """Parse and filter one batch's completions: (accepted tasks, skip counts per reason, a few examples each).
    Accepted tasks are added to `pool` as they are found."""
    accepted: list[dict] = []
    skipped: Counter = Counter()
    examples: dict[str, list] = {}

    def skip(reason: str, example: dict) -> None:
        skipped[reason] += 1
        if len(examples.setdefault(reason, [])) < sec.examples_per_reason:
            examples[reason].append(example)

    for comp in completions:
        for piece in parse_completion(comp.text, sec.prompt_tasks, sec.list_length, comp.finished):
            if piece.task is None:
                skip(piece.reason, {"text": piece.text[:EXAMPLE_CHARS]})
                continue
            task = piece.task
            reason = reject_reason(task, min_words=sec.min_words, max_words=sec.max_words, blacklist=sec.blacklist,
                                   drop_write_a_program=sec.drop_write_a_program)
            if reason:
                skip(reason, {k: v[:EXAMPLE_CHARS] for k, v in task.items()})
                continue
            score, similar = pool.most_similar(task["instruction"])
            if score >= sec.similarity_threshold:
                skip("too_similar", {"instruction": task["instruction"][:EXAMPLE_CHARS], "most_similar": similar,
                                     "rouge_l": round(score, 4)})
                continue
            pool.add(task["instruction"])
            accepted.append({**task, "max_rouge_l": round(score, 4), "most_similar": similar})
    return accepted, skipped, examples


def setup(ctx, sec) -> tuple[str, str, list[dict], dict]:
    """(backend, model path, seed tasks, the seed file's report), each checked before any model loads."""
    if not sec.model:
        raise ConfigError("self_instruct.model: name the model that writes new tasks (a local folder or a hub id), "
                          "e.g. --self_instruct.model=/models/Llama-3.1-8B")
    backend = resolve_backend(sec.backend)  # a vLLM that cannot run fails here, before any work
    model_path = ctx.resolve(sec.model)
    seeds, seed_report = load_seed_tasks(sec.seed_tasks, resolve=lambda p: ctx.resolve(p, model=False))
    if len(seeds) < sec.prompt_tasks:
        raise ConfigError(f"self_instruct.prompt_tasks: {sec.prompt_tasks} examples per prompt, but only "
                          f"{len(seeds)} usable seed tasks in {sec.seed_tasks.path}")
    return backend, model_path, seeds, seed_report


def write_batch(k: int, generator, sec, run_seed: int, seeds: list[dict], generated: list[dict], pool,
                generator_info: dict) -> dict:
    """Batch k: `batch_size` prompts, each listing examples drawn from the seed and generated tasks, one completion
    each, judged (`judge_batch`, which adds what it accepts to the pool). Returns the batch's record for
    batches.jsonl."""
    rng = random.Random(derive_seed(sec.seed, run_seed, k, 0))
    prompts = [encode_prompt(sample_examples(rng, seeds, generated, sec.prompt_tasks, sec.prompt_generated),
                             sec.list_length) for _ in range(sec.batch_size)]
    sampling = Sampling(n=1, temperature=sec.temperature, top_p=sec.top_p, max_new_tokens=sec.max_new_tokens,
                        seed=derive_seed(sec.seed, run_seed, k, 1))
    completions = [c[0] for c in generator.generate(prompts, sampling)]
    accepted, batch_skipped, batch_examples = judge_batch(completions, sec, pool)  # adds to the pool
    return {"batch": k, "accepted": accepted, "candidates": len(accepted) + sum(batch_skipped.values()),
            "skipped": dict(batch_skipped), "skip_examples": batch_examples, "generator": generator_info,
            "finished": sum(c.finished for c in completions)}


def run(ctx) -> dict:
    """Setup (the model, the seed tasks, the batches a killed run left), batches until `num_instructions` tasks are
    accepted (or `max_batches`), then data.json and the summary."""
    from tqdm.auto import tqdm

    sec = ctx.section
    backend, model_path, seeds, seed_report = setup(ctx, sec)
    generator_info = {"path": str(model_path), "sha256": weights_sha256(model_path), "backend": backend}

    log = BatchLog(ctx.dir / "batches.jsonl")
    if any(r["generator"]["sha256"] != generator_info["sha256"] for r in log.records):
        print("[self_instruct] batches.jsonl was written by other weights: starting over", flush=True)
        log.reset()
    pool = SimilarityPool([t["instruction"] for t in seeds])
    generated: list[dict] = []
    skipped: Counter = Counter()
    examples: dict[str, list] = {}
    candidates = 0

    def tally(rec: dict, add_to_pool: bool) -> None:
        nonlocal candidates
        for task in rec["accepted"]:
            if add_to_pool:
                pool.add(task["instruction"])
            generated.append(task)
        skipped.update(rec["skipped"])
        for reason, exs in rec["skip_examples"].items():
            mine = examples.setdefault(reason, [])
            mine += exs[:sec.examples_per_reason - len(mine)]
        candidates += rec["candidates"]

    for rec in log.records:  # the pool as the killed run left it
        tally(rec, add_to_pool=True)
    resumed = len(log.records)

    generator = None  # built only if a batch is left to do
    bar = tqdm(total=sec.num_instructions, initial=min(len(generated), sec.num_instructions), desc="self_instruct",
               unit="task", dynamic_ncols=True)
    k = len(log.records)
    while len(generated) < sec.num_instructions and k < sec.max_batches:
        if generator is None:
            generator = make_generator(model_path, backend, batch_size=sec.batch_size, dtype=sec.dtype,
                                       tensor_parallel_size=sec.tensor_parallel_size,
                                       gpu_memory_utilization=sec.gpu_memory_utilization, seed=sec.seed)
        rec = write_batch(k, generator, sec, ctx.seed, seeds, generated, pool, generator_info)
        log.append(rec)
        tally(rec, add_to_pool=False)
        bar.update(min(len(generated), sec.num_instructions) - bar.n)
        ctx.tracker.log({"self_instruct/accepted": len(generated), "self_instruct/candidates": candidates,
                         "self_instruct/batch_accepted": len(rec["accepted"])}, step=k)
        k += 1
    bar.close()

    rows, out = save_tasks(ctx, (seeds if sec.include_seed_tasks else []) + generated)

    summary = {
        "seed_tasks": seed_report,
        "batches": k,
        "resumed_batches": resumed,
        "prompts": k * sec.batch_size,
        "candidates": candidates,
        "accepted": len(generated),
        "skipped": dict(sorted(skipped.items())),
        "acceptance_rate": round(len(generated) / candidates, 4) if candidates else 0.0,
        "skip_examples": examples,
        "rows_written": len(rows),
        "output": str(out),
        "reached_target": len(generated) >= sec.num_instructions,
        "generator": generator_info,
    }
    print(report(summary), flush=True)
    if not rows:  # the stage exists to write data: an empty data.json would fail the next stage, unexplained
        why = ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items()) or "no pieces parsed"
        raise DataError(f"self_instruct.model {model_path}", None, None, f"no task accepted from the {candidates} "
                        f"pieces it wrote in {k} batches ({why}; an example of each reason is in the stage's log); "
                        "try a stronger writer or more self_instruct.max_batches")
    return summary


def save_tasks(ctx, tasks: list[dict]) -> tuple[list[dict], Path]:
    """The tasks as Alpaca rows (instruction, input, output) in the stage's data.json, logged as a dataset."""
    rows = [{"instruction": t["instruction"], "input": t["input"], "output": t["output"]} for t in tasks]
    out = ctx.dir / "data.json"
    write_json(out, rows)
    ctx.tracker.log_artifact(out, name=f"{ctx.cfg.name}-self-instruct", type_="dataset")
    return rows, out


def report(summary: dict) -> str:
    """What the run kept and why it dropped the rest, one reason a line with an example."""
    seeds = summary["seed_tasks"]
    lines = [f"[self_instruct] {summary['accepted']} tasks accepted of {summary['candidates']} parsed pieces "
             f"({summary['batches']} batches, {summary['resumed_batches']} resumed); seed tasks: {seeds['rows']} read, "
             f"{seeds['skipped']} skipped"]
    for ex in seeds["skip_examples"][:3]:
        lines.append(f"    seed skipped: {ex}")
    for reason, n in summary["skipped"].items():
        ex = (summary["skip_examples"].get(reason) or [{}])[0]
        shown = ex.get("instruction", ex.get("text", ""))
        lines.append(f"  {reason:<24} {n:>6}   e.g. {json.dumps(shown[:80], ensure_ascii=False)}")
    lines.append(f"[self_instruct] {summary['rows_written']} rows -> {summary['output']}")
    return "\n".join(lines)
