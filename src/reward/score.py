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
then written. One line and exit code 143 (prefopt.faults.ShardsPreempted); the rerun resumes at the first shard not
written, and writes what an uninterrupted run writes, byte for byte.

What the reward model reads is what it was trained on: for a classifier (TRL's RewardTrainer) prompt text +
response + EOS, right padded, the score being the head's first logit (or a hub model's `score` field) at the token
the model reads on that text alone, whatever its lookup (`batch_pad_id`); for a likelihood
reward model (reward/likelihood.py) beta times the mean log-prob of the response tokens and EOS given the prompt.

Which prompt text (`rm_format`, also on `ppo` and `evaluate`): `policy` gives the classifier the policy's rendered
prompt, as the `reward` stage trained it; `chat` gives it the user's own prompt (the row's instruction and input,
or its chat messages) and the response as one conversation in the reward model's own chat template, tokenized by
its own tokenizer with one BOS: what hub reward models (Skywork-Reward, ArmoRM) were trained on. `auto` (the
default) is `chat` for a classifier prefopt did not train (no `reward_model.json`) whose tokenizer has a chat
template, else `policy`. Responses always reach the reward model as text, so its vocabulary may differ from the
policy's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm.auto import tqdm

from prefopt import faults
from prefopt.config import ConfigError
from prefopt.data.errors import DataError
from prefopt.data.templates import encode, prompt_messages
from prefopt.gpus import data_parallel_size, free_gpu_memory, run_workers
from prefopt.io import content_hash, iter_jsonl, weights_sha256, write_jsonl


def reward_text(prompt: str, response: str, eos_token: str | None) -> str:
    """The text a reward model scores: rendered prompt + response + EOS (as RewardTrainer builds it)."""
    text = prompt + response
    if eos_token and not text.endswith(eos_token):
        text += eos_token
    return text


def chat_reward_text(messages: list[dict], response: str, tokenizer) -> str:
    """The text a hub reward model scores (`rm_format: chat`): the user's turns and the response as the assistant's
    turn, in the reward model's own chat template, as Skywork-Reward's and ArmoRM's model cards build it. No EOS is
    added: the template closes the assistant turn itself. A template that writes BOS (Llama-3's) keeps one BOS,
    since `score_texts` tokenizes through `encode`."""
    return tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)


class ClassifierScorer:
    """Scores (prompt, response) with a sequence classifier, as the model scores each text alone: a prompt
    given as text is the policy's rendering (prompt + response + EOS, what TRL's RewardTrainer trains on), one given
    as chat messages goes through the reward model's own chat template (`chat_reward_text`)."""

    kind = "classifier"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def score(self, prompts: list[str | list[dict]], responses: list[str], batch_size: int = 64,
              max_length: int = 512, progress=None) -> list[float]:
        texts = [chat_reward_text(p, r, self.tokenizer) if isinstance(p, list)
                 else reward_text(p, r, self.tokenizer.eos_token) for p, r in zip(prompts, responses)]
        return score_texts(self.model, self.tokenizer, texts, batch_size, max_length, progress)


def rm_input_format(rm_format: str, path: str, key: str, from_stage: bool = False,
                    trust_remote_code: bool = False) -> str:
    """`policy` or `chat`: what `rm_format` (`key`, e.g. `score.rm_format`) means for the reward model at `path`.
    Reads its `reward_model.json` and tokenizer, not its weights, so a wrong setting stops the stage before any
    scoring (and `prefopt check` before any stage).

    `auto`: whatever prefopt trained (a `stage:` reference, or a folder with `reward_model.json`) read the policy's
    text in training and keeps reading it; any other reward model whose tokenizer has a chat template was trained
    on that template."""
    from prefopt.reward.likelihood import read_meta

    if rm_format == "policy":
        return "policy"
    meta = read_meta(path) if Path(path).is_dir() else None
    if rm_format == "auto" and (from_stage or meta is not None):
        return "policy"
    if meta is not None and meta["kind"] == "likelihood":
        raise ConfigError(f"{key}: chat needs a sequence-classification reward model, but {path} is a likelihood "
                          f"reward model trained on the policy's text (use {key}: policy)")
    from prefopt.models import load_tokenizer

    has_template = bool(getattr(load_tokenizer(path, trust_remote_code=trust_remote_code), "chat_template", None))
    if rm_format == "chat" and not has_template:
        raise ConfigError(f"{key}: chat, but the reward model {path} has no chat template in its tokenizer (use "
                          f"{key}: policy)")
    return "chat" if has_template else "policy"


def rm_prompt(row: dict, rendered: str, fmt: str, key: str, where: str = "") -> str | list[dict]:
    """What the reward model is given as `row`'s prompt: the policy's `rendered` text, or for `chat` the user's own
    turns from the row's data (`prompt_messages`), which `ClassifierScorer` puts in the reward model's template."""
    if fmt == "policy":
        return rendered
    messages = prompt_messages(row)
    if messages is None:
        raise ConfigError(f"{key}: chat needs each prompt as the user wrote it (Alpaca instruction/input or chat "
                          f"messages), but prompt_id {row.get('prompt_id')!r}{where} has only rendered text (use "
                          f"{key}: policy)")
    return messages


def reward_model_config(path: str, trust_remote_code: bool = False, key: str = "trust_remote_code"):
    """The reward model's transformers config, read before any weights load. A model that ships its own code
    without `trust_remote_code` is a one-line error naming the setting, in both of the ways a config says so: a
    `model_type` transformers does not know (its config class is remote too), or a known one (ArmoRM's is `llama`)
    whose `auto_map` names its own sequence classifier. transformers loads the second kind, untrusted, as its plain
    classifier with a new, random `score` head, without a word."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" not in str(e) or trust_remote_code:
            raise
        config = None
    own = (getattr(config, "auto_map", None) or {}).get("AutoModelForSequenceClassification")
    if config is None or (own and not trust_remote_code):
        raise ConfigError(f"the reward model {path} ships its own model code (auto_map in its config.json): set "
                          f"{key}: true to run it (only for a model you trust)")
    return config


def load_scorer(path: str, trust_remote_code: bool = False, key: str = "trust_remote_code", device: str | None = None,
                dtype=None):
    """A scorer (`.score(prompts, responses, batch_size, max_length)`, `.model`, `.tokenizer`) for a reward-model
    folder or hub id, eval mode: a likelihood reward model (a causal LM with `reward_model.json`,
    reward/likelihood.py) or any AutoModelForSequenceClassification. By default on the GPU in bf16 if there is one
    (the score and evaluate stages); a caller that shards the model itself (PPO under FSDP) passes device="cpu" and
    its dtype, so the whole model never lands on one GPU before sharding.

    A causal LM folder without `reward_model.json` would get a random head: refused, train one first."""
    import torch

    from prefopt.models import load_causal_lm, load_reward_model, load_tokenizer
    from prefopt.reward.likelihood import LikelihoodScorer, read_meta

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    meta = read_meta(path) if Path(path).is_dir() else None
    if meta is not None and meta["kind"] == "likelihood":
        name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
        model = load_causal_lm(path, dtype=name).to(device).eval()
        return LikelihoodScorer(model, load_tokenizer(path, padding_side="right"), meta["beta"])
    config = reward_model_config(path, trust_remote_code, key)
    archs = getattr(config, "architectures", None) or []
    if archs and all(a.endswith("ForCausalLM") for a in archs):
        raise ValueError(f"{path} is a causal LM ({archs[0]}), not a reward model: train one with the `reward` stage "
                         "or name a sequence-classification checkpoint")
    # Every weight from the checkpoint (a missing head is refused, never scored at random); the pad id is chosen per
    # batch by `score_texts`.
    model = load_reward_model(path, trust_remote_code, num_labels=None, dtype=dtype, complete=True)
    tok = load_tokenizer(path, padding_side="right", trust_remote_code=trust_remote_code)
    return ClassifierScorer(model.to(device).eval(), tok)


def scorer_sha256(path: str) -> str:
    """What names a reward model in caches and provenance: its weights, and a likelihood reward model's
    `reward_model.json` (its beta scales every score; a classifier's marker changes none)."""
    from prefopt.reward.likelihood import META, read_meta

    sha = weights_sha256(path)
    meta = read_meta(path) if Path(path).is_dir() else None
    return content_hash(sha, (Path(path) / META).read_text()) if meta and meta["kind"] == "likelihood" else sha


def batch_pad_id(own: int | None, rows: list[list[int]], vocab: int) -> int:
    """The id that right-pads a batch of token-id `rows` so the model reads each row where it reads it alone.

    A sequence classifier finds a row's last token from its pad id: transformers' *ForSequenceClassification take the
    rightmost token that is not the pad id (5.17 and 5.23 alike, `modeling_layers.py`), ArmoRM's own code the token
    before the first pad id, and with no pad id (a batch of one) the last position. Padding with the checkpoint's
    own pad id (`own`, when it is an id of the vocabulary) leaves each lookup where it lands on the row alone:
    trailing pad ids are skipped, and the first pad id is the row's own or the padding's first. Without one (none,
    or an id outside the embeddings), the row alone is read at its last token, the EOS or end-of-turn that closes
    it; padding with the tokenizer's stand-in pad (EOS for Llama-3, which ships none) would move both lookups off
    it, to the token before the final EOS or before the first end-of-turn. An id that occurs in no row of the
    batch, given to the model as its pad id for that forward (`score_texts`), makes both lookups read the last
    token."""
    if own is not None and 0 <= own < vocab:
        return own
    used = {i for r in rows for i in r}
    return next(i for i in range(vocab) if i not in used)


def score_texts(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 512,
                progress=None) -> list[float]:
    """Reward of each text (already `reward_text`), batched, each equal to the model's score of the text alone
    (`batch_pad_id`). Texts are sorted by length so batches pad little."""
    import torch

    device = next(model.parameters()).device
    base = getattr(model, "module", model)  # the model itself under a DDP wrapper
    config = getattr(base, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    own = getattr(config, "pad_token_id", None)
    try:
        vocab = base.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        vocab = len(tokenizer)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [0.0] * len(texts)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            # One BOS per text (`encode`): a prompt rendered by a chat template that writes BOS already has it.
            ids = [encode(texts[i], tokenizer, truncation=True, max_length=max_length) for i in idx]
            pad = batch_pad_id(own, ids, vocab)
            if config is None and tokenizer.pad_token_id is not None:
                pad = tokenizer.pad_token_id  # a model with no config to tell: padded as its tokenizer pads
            T = max(len(r) for r in ids)
            input_ids = torch.tensor([r + [pad] * (T - len(r)) for r in ids], device=device)  # (B, T), right padded
            mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in ids], device=device)
            if config is not None and pad != own:
                config.pad_token_id = pad  # for this forward only: the model's lookup then finds each row's end
            try:
                res = model(input_ids=input_ids, attention_mask=mask)
            finally:
                if config is not None:
                    config.pad_token_id = own
            # Some hub reward models (ArmoRM) return a `score` field beside their multi-objective logits.
            scores = getattr(res, "score", None)
            scores = (scores if scores is not None else res.logits[:, 0]).float().reshape(-1).cpu().tolist()
            for i, s in zip(idx, scores):
                out[i] = s
            if progress is not None:
                progress.update(len(idx))
    return out


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
    from prefopt.reward.functions import load_reward_function

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


def run(ctx) -> dict:
    """From loading to the last shard, a signal drops the shard being scored (or stops before the next one)."""
    with faults.ShardSignals(ctx.stage) as signals:
        return _run(ctx, signals)


def _run(ctx, signals: faults.ShardSignals) -> dict:
    from prefopt.gpus import WorkerFailed

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
        try:
            run_workers(ctx.dir, {**job, "worker": "prefopt.reward.score:score_worker", "cache": str(cache.path),
                                  "shards": {s: plan[s] for s in todo if plan[s]}},
                        workers, 1, "scoring", "score.data_parallel")
        except WorkerFailed:
            if not signals.signum:
                raise
            # the workers got the signal too (passed on by ShardSignals) and dropped their shards: the loop below
            # writes the shards whose scores are all in the cache and stops at the first that is not
            dropped = True
        finally:
            cache.merge_parts()  # what every worker finished, also when one failed

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
                scorer = load_scorer(rm_path, cfg.trust_remote_code, key="score.trust_remote_code")
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

    summary = {
        "shards": len(shards),
        "shards_skipped": len(shards) - len(todo),
        "candidates": len(all_scores),
        "scored": scored,
        "cached": cached,
        "reward_model": {"path": str(rm_path), "sha256": rm_sha},
        "rm_format": fmt,
        "data_parallel": max(workers, 1),
    }
    if all_scores:
        import statistics

        summary["score/mean"] = statistics.fmean(all_scores)
        summary["score/std"] = statistics.pstdev(all_scores)
        summary["score/min"], summary["score/max"] = min(all_scores), max(all_scores)
    return summary


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
    """One data-parallel worker (`prefopt.gpus.run_workers`): its own reward model on its own GPU, every `world`-th
    shard of the plan from `rank`, the scores appended to its own cache part after each shard. A signal (passed on
    by the stage) drops the shard being scored, or lets the append finish and stops before the next."""
    part = ScoreCache.part(job["cache"], rank)
    mine = sorted(job["shards"])[rank::world]
    with faults.ShardSignals(f"score worker {rank}") as signals:
        scorer = load_scorer(job["rm_path"], job["sec"].trust_remote_code, key="score.trust_remote_code")
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


def scoring_length(path: str, configured: int, key: str, trust_remote_code: bool = False,
                   trust_key: str = "trust_remote_code") -> int:
    """Tokens the reward model at `path` reads of each prompt + response: `configured` (the stage's `key`) when set,
    else (0) the model's own limit, the smaller of its config's `max_position_embeddings` and its tokenizer's
    `model_max_length` where each is a real number (a tokenizer without a limit says 1e30). A fixed default would
    cut answers of 4,096 tokens to their first 512 for a model that reads 8K. Reads the config and tokenizer, not
    the weights, so a wrong length stops the stage before any scoring.

    A configured length above the model's limit is a config error naming `key`: the model has no positions for the
    tokens past it."""
    from prefopt.models import load_tokenizer

    try:
        config = reward_model_config(path, trust_remote_code, trust_key)
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    except OSError:
        if configured:  # unreadable here (not cached offline, a stand-in): loading the scorer says why, if it fails
            return configured
        raise
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = {"max_position_embeddings": getattr(text, "max_position_embeddings", None),
              "model_max_length": getattr(tok, "model_max_length", None)}
    limits = {k: int(v) for k, v in limits.items() if isinstance(v, (int, float)) and 0 < v < 1e9}
    if not limits:
        if configured:
            return configured
        raise ConfigError(f"{key}: the reward model {path} states no length limit (no max_position_embeddings in its "
                          f"config, no model_max_length in its tokenizer): set {key} to the tokens it reads")
    name = min(limits, key=limits.get)
    if configured > limits[name]:
        raise ConfigError(f"{key}: {configured} tokens, but the reward model {path} reads at most {limits[name]} "
                          f"({name}): set {key} to {limits[name]} or less, or 0 for its own limit")
    return configured or limits[name]
