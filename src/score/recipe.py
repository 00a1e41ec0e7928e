"""The `score` stage: score every generated candidate with a reward model, in batches, resumable and cached.

    prefopt score experiments/quickstart.yaml
    prefopt score experiments/quickstart.yaml --score.reward_model=Skywork/Skywork-Reward-Llama-3.1-8B

Reads `generate/shard-*.jsonl` and writes one `score/shard-*.jsonl` per input shard, each written atomically:
a killed run rescores at most the shard it was in, and finished shards are skipped. Every score is also kept in
`<experiment>/cache/scores.jsonl`, keyed by (prompt, response, reward-model weights hash, max_length), so scoring
the same candidates again (another round, a rerun after a config change elsewhere) costs no model call.

Over a node's GPUs (`score.data_parallel`, 0: one per visible GPU): one process per GPU, each with its own reward
model and every N-th shard with something to score; each appends its scores to its own cache part, merged into the
cache when they exit, and this process then writes the shards from the cache. Which candidate a shard scores is
planned before any worker starts, as one process would do it (`scoring_plan`), so the shards and the cache are one
process's.

Preemption: SIGTERM / SIGINT / SIGUSR1 drop the shard being scored at once (its scores reach neither the cache nor
a shard file) or, while a shard or the cache is written, let that write finish; no new shard is scored after it.
Data-parallel workers get the signal from this process and do the same; the shards whose scores are all cached are
then written. One line and exit code 143 (prefopt.runtime.faults.ShardsPreempted); the rerun resumes at the first shard not
written, and writes what an uninterrupted run writes, byte for byte.

How a reward model reads its input, and loading it: the scorer library (prefopt.scoring.scorer).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm.auto import tqdm

from prefopt.data.errors import DataError
from prefopt.dist.gpus import data_parallel_size, free_gpu_memory, run_workers
from prefopt.io import content_hash, iter_jsonl, write_jsonl
from prefopt.runtime import faults
from prefopt.scoring import scorer as scoring  # scoring.load_scorer: one name to replace in a test, for every stage
from prefopt.scoring.scorer import rm_input_format, rm_prompt, scorer_sha256, scoring_length


class ScoreCache:
    """Scores already computed, keyed by (prompt, response, reward-model hash, max_length); an append-only JSONL.

    One writer a file: data-parallel workers (`score.data_parallel`) never append here but each to its own part
    (`part`, `scores.worker-R.jsonl` beside it), which the stage folds in (`merge_parts`) once they have exited; a
    new cache folds in the parts a killed run left. So no two processes interleave lines, and no score a worker
    finished is lost."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.scores: dict[str, float] = read_scores(self.path)
        self.merge_parts()

    @staticmethod
    def part(path: str | Path, rank: int) -> Path:
        """Where data-parallel worker `rank` appends the scores it computes for the cache at `path`."""
        path = Path(path)
        return path.with_name(f"{path.stem}.worker-{rank}{path.suffix}")

    def merge_parts(self) -> int:
        """Append every worker part to the cache and remove it (a kill between the two leaves the part's lines
        twice: the same keys and scores, read once). Returns the scores merged."""
        n = 0
        for part in sorted(self.path.parent.glob(f"{self.path.stem}.worker-*{self.path.suffix}")):
            items = read_scores(part)
            append_scores(self.path, items)
            self.scores.update(items)
            part.unlink()
            n += len(items)
        return n

    @staticmethod
    def key(prompt: str | list[dict], response: str, rm_sha: str, max_length: int) -> str:
        return content_hash(prompt, response, rm_sha, max_length)

    def get(self, key: str) -> float | None:
        return self.scores.get(key)

    def add(self, items: dict[str, float]) -> None:
        append_scores(self.path, items)
        self.scores.update(items)


def read_scores(path: Path) -> dict[str, float]:
    scores = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    scores[row["key"]] = row["score"]
                except (ValueError, KeyError):
                    continue  # a line cut short by a kill: that score is recomputed
    return scores


def append_scores(path: Path, items: dict[str, float]) -> None:
    """Append `items` as JSON lines and sync them to disk. A last line a kill cut short is ended first, so the
    first new line is not glued to it (and lost with it)."""
    if not items:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"key": k, "score": v}) + "\n" for k, v in items.items())
    with open(path, "ab") as f:
        if f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    lines = "\n" + lines
        f.write(lines.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def input_shards(folder: str | Path) -> list[Path]:
    shards = sorted(Path(folder).glob("shard-*.jsonl"))
    if not shards:
        raise FileNotFoundError(f"no candidate shards (shard-*.jsonl) in {folder}: run the generate stage first")
    return shards


def run_function(ctx, cfg, signals: faults.ShardSignals) -> dict:
    """Score every candidate with a reward function (`score.reward_fn`): all shards checked before any is written,
    so a NaN or a wrong shape stops the stage with nothing half-written (and a signal, with nothing written)."""
    from prefopt.scoring.functions import load_reward_function

    fn = load_reward_function(cfg.reward_fn, ctx.cfg.task)
    shards = input_shards(ctx.resolve(cfg.candidates, model=False))
    provenance = {"path": fn.name, "sha256": content_hash(fn.name)}
    outputs, all_scores = {}, []
    try:
        with signals.sampling():
            for shard in tqdm(shards, desc="score", unit="shard", disable=not ctx.is_main):
                out = []
                for r in iter_jsonl(shard):
                    scores = fn([r] * len(r["candidates"]), r["candidates"])
                    all_scores += scores
                    out.append({"prompt_id": r["prompt_id"], "scores": scores, "reward_model": provenance})
                outputs[shard.name] = out
    except faults.ShardDropped:
        raise preempted(ctx.dir, shards, signals, dropped=True) from None
    for name, out in outputs.items():
        write_jsonl(ctx.dir / name, out)
    if signals.signum:  # came while the shards were written: they are, but the stage stops here
        raise preempted(ctx.dir, shards, signals, dropped=False)
    summary = {"shards": len(shards), "candidates": len(all_scores), "scored": len(all_scores), "cached": 0,
               "reward_model": provenance}
    if all_scores:
        import statistics

        summary["score/mean"] = statistics.fmean(all_scores)
        summary["score/std"] = statistics.pstdev(all_scores)
    return summary


def check_finite(shard: Path, rows: list[dict], keys: list[list[str]], new: dict[str, float], rm_path: str) -> None:
    """Refuse a NaN or infinite score from the reward model before it reaches a shard or the cache (where every
    later run would reuse it), naming the candidate it was given for."""
    for n, (r, ks) in enumerate(zip(rows, keys), start=1):
        for j, k in enumerate(ks):
            s = new.get(k)
            if s is not None and not (isinstance(s, (int, float)) and math.isfinite(s)):
                raise DataError(shard, n, f"candidates[{j}]", f"the reward model {rm_path} gave a non-finite score "
                                f"({s!r}) for prompt_id {r['prompt_id']!r}", "check the reward model")


def preempted(out_dir: Path, shards: list[Path], signals: faults.ShardSignals,
              dropped: bool) -> faults.ShardsPreempted:
    """The stage's line: how many output shards are on disk (each whole) and the first one the rerun does."""
    on_disk = [(Path(out_dir) / s.name).exists() for s in shards]
    return faults.ShardsPreempted("score", signals.signum, sum(on_disk), len(shards), dropped,
                                  None if all(on_disk) else on_disk.index(False))


@faults.handled(faults.ShardSignals)
def run(ctx, signals: faults.ShardSignals) -> dict:
    """Setup (the reward model, what it reads, the shards left and the cache), the data-parallel workers when there
    are several GPUs, the shards scored and written here, and the summary. From loading to the last shard, a
    signal drops the shard being scored (or stops before the next one)."""
    cfg = ctx.section
    if cfg.reward_fn:
        return run_function(ctx, cfg, signals)
    rm_path = ctx.resolve(cfg.reward_model)
    fmt = rm_input_format(cfg.rm_format, rm_path, "score.rm_format", cfg.reward_model.startswith("stage:"),
                          cfg.trust_remote_code)
    length = scoring_length(rm_path, cfg.max_length, "score.max_length", cfg.trust_remote_code,
                            "score.trust_remote_code")
    rm_sha = scorer_sha256(rm_path)
    # The cache key names what the reward model reads: chat-format scores are kept apart from policy-format ones.
    job = {"rm_path": str(rm_path), "sec": cfg, "fmt": fmt, "length": length,
           "rm_id": rm_sha if fmt == "policy" else content_hash(rm_sha, "chat")}
    shards = input_shards(ctx.resolve(cfg.candidates, model=False))
    cache = ScoreCache(ctx.cfg.root / "cache" / "scores.jsonl")
    todo = [s for s in shards if not (ctx.dir / s.name).exists()]
    # Every row's reward-model prompt before any scoring: a row without its raw prompt stops the stage here.
    plan, total = scoring_plan(todo, cache, job)
    print(f"[score] reward model {rm_path} reads the {'policy' if fmt == 'policy' else 'its own chat'} format "
          f"(score.rm_format: {cfg.rm_format})", flush=True)

    workers = min(data_parallel_size(cfg.data_parallel), sum(1 for s in todo if plan[s]))
    dropped = False
    if workers > 1 and not signals.signum:  # one reward model per process and GPU; the loop below writes the shards
        dropped = score_data_parallel(ctx, job, cache, {s: plan[s] for s in todo if plan[s]}, workers, signals)

    scorer = None
    scored = cached = 0
    all_scores: list[float] = []
    bar = tqdm(total=total, desc="score", unit="cand", disable=not ctx.is_main)
    for shard in todo:
        rows, keys, missing = shard_work(shard, job, {k for k in plan[shard] if cache.get(k) is None})
        n = sum(len(ks) for ks in keys)
        scored += len(plan[shard])  # here or by a worker
        cached += n - len(plan[shard])
        bar.update(n - len(missing))
        if missing:
            if signals.signum:  # came while a shard was written, or the workers ran: no new scoring
                raise preempted(ctx.dir, shards, signals, dropped)
            if scorer is None:  # loaded only when something needs scoring: a fully cached run loads nothing
                scorer = scoring.load_scorer(rm_path, cfg.trust_remote_code, key="score.trust_remote_code")
            try:
                with signals.sampling():  # (also when the signal came while the reward model loaded)
                    new = score_missing(scorer, shard, rows, keys, missing, job, progress=bar)
            except faults.ShardDropped:
                raise preempted(ctx.dir, shards, signals, dropped=True) from None
            cache.add(new)  # whole lines, synced; a signal now waits for it, and for the shard's file below
        out = []
        for r, ks in zip(rows, keys):
            scores = [cache.get(k) for k in ks]
            all_scores += scores
            out.append({"prompt_id": r["prompt_id"], "scores": scores,
                        "reward_model": {"path": str(rm_path), "sha256": rm_sha}})
        write_jsonl(ctx.dir / shard.name, out)
        ctx.tracker.log({"scored": scored, "cached": cached})
    bar.close()
    if signals.signum:  # every shard is written, but the stage stops here (`prefopt run` goes no further)
        raise preempted(ctx.dir, shards, signals, dropped)
    if scorer is not None:
        scorer = None  # the last reference to the reward model: its GPU memory goes back before the next stage
        free_gpu_memory()

    return score_summary(len(shards), len(todo), all_scores, scored, cached,
                         {"path": str(rm_path), "sha256": rm_sha}, fmt, max(workers, 1))


def score_data_parallel(ctx, job: dict, cache, shards: dict, workers: int, signals: faults.ShardSignals) -> bool:
    """`shards` (shard -> cache keys to score) scored by `workers` processes, one reward model each, into the cache;
    True when a signal made them drop their shards."""
    from prefopt.dist.gpus import WorkerFailed

    try:
        run_workers(ctx.dir, {**job, "worker": "prefopt.score.recipe:score_worker", "cache": str(cache.path),
                              "shards": shards}, workers, 1, "scoring", "score.data_parallel")
    except WorkerFailed:
        if not signals.signum:
            raise
        # the workers got the signal too (passed on by ShardSignals) and dropped their shards: the loop below
        # writes the shards whose scores are all in the cache and stops at the first that is not
        return True
    finally:
        cache.merge_parts()  # what every worker finished, also when one failed
    return False


def score_summary(n_shards: int, n_todo: int, all_scores: list[float], scored: int, cached: int, reward_model: dict,
                  fmt: str, workers: int) -> dict:
    """The stage's summary: shards, candidates scored and cached, the reward model, and the scores' statistics."""
    out = {
        "shards": n_shards,
        "shards_skipped": n_shards - n_todo,
        "candidates": len(all_scores),
        "scored": scored,
        "cached": cached,
        "reward_model": reward_model,
        "rm_format": fmt,
        "data_parallel": workers,
    }
    if all_scores:
        import statistics

        out["score/mean"] = statistics.fmean(all_scores)
        out["score/std"] = statistics.pstdev(all_scores)
        out["score/min"], out["score/max"] = min(all_scores), max(all_scores)
    return out


def shard_keys(shard: Path, job: dict) -> tuple[list[dict], list, list[list[str]]]:
    """A candidate shard's rows, each row's reward-model prompt and the cache key of each of its candidates."""
    rows = list(iter_jsonl(shard))
    prompts = [rm_prompt(r, r["prompt"], job["fmt"], "score.rm_format", f" ({shard}, row {n})")
               for n, r in enumerate(rows, start=1)]
    keys = [[ScoreCache.key(p, c, job["rm_id"], job["length"]) for c in r["candidates"]]
            for r, p in zip(rows, prompts)]
    return rows, prompts, keys


def scoring_plan(todo: list[Path], cache: ScoreCache, job: dict) -> tuple[dict[Path, list[str]], int]:
    """What each shard left to do scores: the keys not in the cache, each in the first shard (and row) it is in, as
    one process scoring the shards in order does. A worker given a shard then scores exactly the batches one
    process would, and the shards it writes are one process's. Also the number of candidates in `todo`."""
    plan, seen, total = {}, set(), 0
    for shard in todo:
        _, _, keys = shard_keys(shard, job)
        plan[shard] = []
        for k in (k for ks in keys for k in ks):
            if k not in seen and cache.get(k) is None:
                plan[shard].append(k)
            seen.add(k)
        total += sum(len(ks) for ks in keys)
    return plan, total


def shard_work(shard: Path, job: dict, wanted: set[str]) -> tuple[list[dict], list[list[str]], dict]:
    """A shard's rows, keys, and {key: (prompt, candidate)} of the `wanted` keys, in the order they occur."""
    rows, prompts, keys = shard_keys(shard, job)
    missing = {}
    for r, p, ks in zip(rows, prompts, keys):
        for c, k in zip(r["candidates"], ks):
            if k in wanted and k not in missing:
                missing[k] = (p, c)
    return rows, keys, missing


def score_missing(scorer, shard: Path, rows: list[dict], keys: list[list[str]], missing: dict, job: dict,
                  progress=None) -> dict[str, float]:
    """The reward model's score of each of a shard's `missing` (prompt, candidate), all finite."""
    new = dict(zip(missing, scorer.score([p for p, _ in missing.values()], [c for _, c in missing.values()],
                                         job["sec"].batch_size, job["length"], progress=progress)))
    check_finite(shard, rows, keys, new, job["rm_path"])
    return new


def score_worker(job: dict, rank: int, world: int) -> None:
    """One data-parallel worker (`prefopt.dist.gpus.run_workers`): its own reward model on its own GPU, every `world`-th
    shard of the plan from `rank`, the scores appended to its own cache part after each shard. A signal (passed on
    by the stage) drops the shard being scored, or lets the append finish and stops before the next."""
    part = ScoreCache.part(job["cache"], rank)
    mine = sorted(job["shards"])[rank::world]
    with faults.ShardSignals(f"score worker {rank}") as signals:
        scorer = scoring.load_scorer(job["rm_path"], job["sec"].trust_remote_code, key="score.trust_remote_code")
        for i, shard in enumerate(mine):
            rows, keys, missing = shard_work(shard, job, set(job["shards"][shard]))
            try:
                with signals.sampling():
                    new = score_missing(scorer, shard, rows, keys, missing, job)
            except faults.ShardDropped:
                raise faults.ShardsPreempted(f"score worker {rank}", signals.signum, i, len(mine), True, None) \
                    from None
            append_scores(part, new)
            print(f"[prefopt] score worker {rank}/{world}: {shard.name}, {len(missing)} candidates scored", flush=True)
            if signals.signum and i + 1 < len(mine):
                raise faults.ShardsPreempted(f"score worker {rank}", signals.signum, i + 1, len(mine), False, None)
