"""The `ppo` stage: PPO against a learned reward model (Ouyang et al. 2022), with the details of Huang et al. 2024.

    prefopt ppo experiments/quickstart.yaml
    prefopt ppo experiments/quickstart.yaml --ppo.kl_coef=0.02 --ppo.total_episodes=4096

Four models: the policy (trained), a frozen reference (loaded again from the same checkpoint), the reward model
(frozen; it reads decoded responses with its own tokenizer, in `rm_format`) and a value model (trained; the RM's
backbone and head applied per token, or the policy's backbone with a fresh head). Each iteration: sample one
response per prompt at `temperature`, score it (minus a penalty when it never emitted EOS), compute per-token
rewards -beta * KL plus the score at the last token, GAE advantages (whitened), then `ppo_epochs` passes over
shuffled minibatches of the clipped policy loss + vf_coef * the clipped value loss, each model with its own AdamW.
Dropout is off everywhere (all models stay in eval mode), so the log-probs of the update match those of the
rollout.

Outputs in the stage folder: `model/` (final policy + tokenizer), `checkpoints/iter-N/` every `save_every`
iterations (policy, value, optimizers, KL controller, RNG and sampler state; the latest two are kept), each written
as `.iter-N.partial/`, its files' SHA-256 recorded in `manifest.json` (prefopt.runtime.faults), then renamed into place. A
killed run resumes from the newest checkpoint whose manifest verifies (the previous one, with a line naming the bad
file, if the newest is damaged; the stage starts over, with a line, if none is) and continues exactly as an
uninterrupted one would.

Preemption (prefopt.runtime.faults): SIGTERM, SIGINT or SIGUSR1 let the current iteration finish its update; every process
agrees on the signal at the iteration's end, a checkpoint of that iteration is saved, and the stage ends with
PreemptedError (exit 143, one line). A signal during the final save lets it finish.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prefopt.runtime import faults
from prefopt.config import ConfigError
from prefopt.generation.base import Sampling
from prefopt.training.logps import masked_mean
from prefopt.models.loading import place_frozen
from prefopt.training.checkpoints import decided_by_main, newest_verified, numbered_folders
from prefopt.ppo.loss import AdaptiveKLController, FixedKLController, explained_variance, ppo_loss
from prefopt.ppo.rollout import ValueModel, collect, policy_forward, reward_model_scorer, trim

KEEP_CHECKPOINTS = 2


class PromptSampler:
    """Prompt indices without replacement, reshuffled each pass over the prompts; its position is checkpointed."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def _order(self) -> list[int]:
        return np.random.default_rng(self.seed + self.epoch).permutation(self.n).tolist()

    def next(self, k: int) -> list[int]:
        out = []
        order = self._order()
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order()
            take = min(k - len(out), self.n - self.pos)
            out += order[self.pos: self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


# ---------------------------------------------------------------------------------------------------- checkpoints

TRAINER_STATE = "trainer_state.pt"


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete `iter-N` folders, oldest first (written under a temporary name and renamed, so complete if
    present; anything else named iter-* is neither resumed from nor pruned)."""
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("iter-*") if p.name[5:].isdigit() and (p / TRAINER_STATE).exists()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete `iter-N` folder (not verified: `resumable_checkpoint` hashes it)."""
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def resumable_checkpoint(accelerator, folder: Path) -> Path | None:
    """The newest `iter-N` whose manifest verifies (the main process hashes, the others are told). A damaged one
    is removed with a line naming the bad file and the previous one is tried; with none left the stage starts
    over, with a line. Collective: every process calls it."""
    return decided_by_main(accelerator, lambda: _newest_valid(Path(folder)))


def _newest_valid(folder: Path) -> str | None:
    for tmp in folder.glob(".iter-*.partial") if folder.is_dir() else []:  # a save a kill cut short
        shutil.rmtree(tmp, ignore_errors=True)
    found = numbered_folders(folder, "iter-")
    return newest_verified(found, "ppo", folder, bool(found))


def save_checkpoint(accelerator, folder: Path, iteration: int, policy, kl_ctl, sampler, last_metrics: dict,
                    snapshot_tokenizer=None) -> Path:
    """A resumable checkpoint `iter-N`: `state/` is `accelerator.save_state` (policy, value, both optimizers and
    every process's RNG, sharded or gathered as the DDP / FSDP / DeepSpeed setup saves them), `trainer_state.pt`
    the loop's own state, `manifest.json` (every file's size and SHA-256) last, before the rename. With
    `snapshot_tokenizer`, also a loadable policy `../snapshots/iter-N`. Collective: every process calls it."""
    out, tmp = folder / f"iter-{iteration}", folder / f".iter-{iteration}.partial"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with faults.writing(tmp):
        _write_checkpoint(accelerator, folder, tmp, out, iteration, policy, kl_ctl, sampler, last_metrics,
                          snapshot_tokenizer)
    accelerator.wait_for_everyone()
    return out


def _write_checkpoint(accelerator, folder: Path, tmp: Path, out: Path, iteration: int, policy, kl_ctl, sampler,
                      last_metrics: dict, snapshot_tokenizer) -> None:
    from prefopt.preference.loop import save_policy

    accelerator.save_state(str(tmp / "state"))
    if snapshot_tokenizer is not None:
        snap = folder.parent / "snapshots" / f"iter-{iteration}"
        tmp_snap = snap.with_name(f".{snap.name}.partial")
        save_policy(accelerator, policy, snapshot_tokenizer, tmp_snap, lora=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save({"iteration": iteration, "kl_controller": kl_ctl.state_dict(), "sampler": sampler.state_dict(),
                    "last_metrics": last_metrics, "num_processes": accelerator.num_processes}, tmp / TRAINER_STATE)
        faults.write_manifest(tmp)  # after every process has written its part: what makes the folder trusted
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        for old in complete_checkpoints(folder)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
        if snapshot_tokenizer is not None:
            if snap.exists():
                shutil.rmtree(snap)
            os.replace(tmp_snap, snap)


def load_trainer_state(ckpt: Path) -> dict:
    # Our own file: the KL controller, the sampler's position and the last metrics (plain Python values).
    return torch.load(ckpt / TRAINER_STATE, weights_only=False)


# ---------------------------------------------------------------------------------------------------- the loop


def global_token_weight(mask: torch.Tensor, local_idx: torch.Tensor, global_idx: torch.Tensor,
                        num_processes: int) -> torch.Tensor:
    """The factor that turns a token mean over this process's rows of a minibatch into its share of the token
    mean over the whole (global) minibatch: n_local / N_global * num_processes (DDP then averages the gradients
    over processes, dividing by num_processes). Exactly 1 on one process, so the one-process loss is unchanged."""
    return mask[local_idx].sum() / mask[global_idx].sum() * num_processes


def ppo_update(policy, value, opt_policy, opt_value, ro, cfg, generator: torch.Generator, accelerator) -> dict:
    """`ppo_epochs` passes over shuffled minibatches of one (global, gathered) rollout; returns the mean of each
    loss metric over the global minibatches.

    Every process holds the whole rollout and draws the same permutation; of each minibatch of `mini_batch_size`
    rows, process r trains on the r-th equal share. Each process's loss is weighted by its share of the
    minibatch's response tokens, so the averaged gradient is that of the token mean over the whole minibatch,
    what one process computes on the same rows."""
    batch, B = ro.batch(), ro.input_ids.shape[0]
    world, rank = accelerator.num_processes, accelerator.process_index
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=generator).to(ro.input_ids.device)
        for start in range(0, B, cfg.mini_batch_size):
            rows = perm[start: start + cfg.mini_batch_size]
            share = len(rows) // world  # a last, shorter minibatch still splits evenly: both sizes divide by world
            mine = rows[rank * share: (rank + 1) * share]
            weight = global_token_weight(batch["mask"], mine, rows, world)
            mb = trim(batch, mine)
            logps, _ = policy_forward(policy, mb["input_ids"], mb["attention_mask"], mb["mask"], cfg.temperature)
            values = value(mb["input_ids"], mb["attention_mask"])[:, :-1]
            loss, step = ppo_loss(logps, mb["logps"], mb["advantages"], values, mb["values"], mb["returns"],
                                  mb["mask"], cfg.cliprange, cfg.cliprange_value, cfg.vf_coef)
            loss = loss * weight
            opt_policy.zero_grad(set_to_none=True)
            opt_value.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                accelerator.clip_grad_norm_(value.parameters(), cfg.max_grad_norm)
            opt_policy.step()
            opt_value.step()
            for k, v in step.items():  # this process's share of the global minibatch's token mean
                sums[k] = sums.get(k, 0.0) + v.detach().double() * weight.double() / world
            n += 1
    names = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[k] for k in names]), reduction="sum") if world > 1 \
        else torch.stack([sums[k] for k in names])
    return {k: float(v) / n for k, v in zip(names, totals)}


def rollout_metrics(ro, kl_coef: float) -> dict:
    m = ro.mask
    return {
        "reward": ro.scores.mean().item(),  # the reward model's score, before the missing-EOS penalty
        "reward/total": ro.rewards.sum(1).mean().item(),  # score - penalty - beta * KL, what PPO maximises
        "kl": ro.kl.sum(1).mean().item(),  # sum_t log pi - log pi_ref: sequence KL, Monte-Carlo, mean over batch
        "kl_coef": kl_coef,
        "entropy": masked_mean(ro.entropy, m).item(),  # per token, at the sampling temperature
        "explained_variance": explained_variance(ro.values, ro.returns, m).item(),
        "length": m.sum(1).mean().item(),
        "eos_fraction": ro.finished.float().mean().item(),
    }


def make_accelerator():
    from accelerate import Accelerator

    # cpu=True without CUDA: under `accelerate launch` on a CPU machine accelerate otherwise starts N independent
    # single-process runs instead of one gloo process group. mixed_precision "no" whatever the launch config says:
    # PPO trains in float32, and autocast on the prepared policy but not on the frozen reference would make
    # KL > 0 before any update (fp16's scaler would also unscale twice, once per optimizer).
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


def check_world(cfg, num_processes: int) -> None:
    """The global rollout and minibatch must split evenly over the processes (each takes an equal share)."""
    for key in ("rollout_batch_size", "mini_batch_size"):
        if getattr(cfg, key) % num_processes:
            raise ConfigError(f"ppo.{key} ({getattr(cfg, key)}) must be a multiple of the number of processes "
                              f"({num_processes}): each process takes an equal share of the global batch")
    local = cfg.rollout_batch_size // num_processes
    if cfg.generation_chunk and local % cfg.generation_chunk:
        raise ConfigError(f"ppo.generation_chunk ({cfg.generation_chunk}) must divide each process's share of "
                          f"ppo.rollout_batch_size ({cfg.rollout_batch_size} / {num_processes} processes = {local})")


def train(policy, ref, value, tokenizer, prompts: list[str], score_fn, generator, cfg, seed: int,
          ckpt_dir: Path, tracker, resume: Path | None = None, accelerator=None,
          signals: faults.StopSignals | None = None) -> dict:
    """The PPO loop over `total_episodes // rollout_batch_size` iterations; returns the last iteration's metrics.

    `score_fn(prompts, completions) -> (B,)` is the reward (the reward model in `run`); `generator` samples from
    the in-memory policy (its `load_weights(policy)`, if it has one, is called before each rollout: a vLLM
    engine takes the new weights), or is a function of the prepared (unwrapped) policy that builds one: `run`
    passes one, so a vLLM engine reserves its memory beside the sharded models, not beside whole copies of them.
    The trained models come in on the CPU (float32) and only `prepare` moves them: each process's device gets its
    shard (FSDP2) or its replica (DDP), never a whole copy before sharding. With several processes,
    `rollout_batch_size` and `mini_batch_size` are global: each process samples and scores its share of the
    prompts, the rollout is gathered, and advantages are whitened over all of it. With `resume`, models,
    optimizers, RNG (accelerate's state), KL controller and sampler continue from that checkpoint.

    SIGTERM, SIGINT and SIGUSR1 (held by `signals`, or by this call) end training after the current iteration's
    update, with a checkpoint of that iteration: prefopt.runtime.faults.PreemptedError."""
    if signals is None:
        with faults.StopSignals("ppo") as signals:
            return train(policy, ref, value, tokenizer, prompts, score_fn, generator, cfg, seed, ckpt_dir, tracker,
                         resume, accelerator, signals)
    accelerator = accelerator or make_accelerator()
    check_world(cfg, accelerator.num_processes)
    ckpt_dir = Path(ckpt_dir)
    opt_policy = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0)
    opt_value = torch.optim.AdamW(value.parameters(), lr=cfg.value_learning_rate, eps=1e-5, weight_decay=0.0)
    # One model per prepare call (FSDP2 swaps each optimizer's parameters for its model's shards, one pair at a
    # time); the order is save_state's: model_0 / optimizer_0 the policy's, model_1 / optimizer_1 the value's.
    policy, opt_policy = accelerator.prepare(policy, opt_policy)
    value, opt_value = accelerator.prepare(value, opt_value)
    ref = place_frozen(accelerator, ref, cfg.shard_reference, "ppo.shard_reference")
    if callable(generator) and not hasattr(generator, "generate"):  # built now: vLLM's share comes after the models
        generator = generator(accelerator.unwrap_model(policy))
    if is_sharded(accelerator):
        accelerator.print(f"[ppo] {accelerator.num_processes} processes: policy and value model sharded (FSDP2), the "
                          f"reference {'sharded' if cfg.shard_reference else 'a full copy on each'} "
                          "(ppo.shard_reference)", flush=True)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
              else FixedKLController(cfg.kl_coef))
    sampler = PromptSampler(len(prompts), seed)
    iterations = max(1, cfg.total_episodes // cfg.rollout_batch_size)
    start, metrics = 0, {}
    if resume is not None:
        state = load_trainer_state(resume)
        saved = state.get("num_processes", 1)
        if saved != accelerator.num_processes:
            # DDP's state dicts carry `module.` prefixes and each process its own RNG file: they load only into
            # the same layout. (The global batch is the same either way; the layout is not.)
            raise ConfigError(f"ppo: checkpoint {resume} was written by {saved} processes but this run has "
                              f"{accelerator.num_processes}: resume with launch.num_processes {saved}, or delete "
                              f"{resume.parent} to start over")
        accelerator.load_state(str(resume / "state"))
        kl_ctl.load_state_dict(state["kl_controller"])
        sampler.load_state_dict(state["sampler"])
        start, metrics = state["iteration"], state["last_metrics"]
        accelerator.print(f"[ppo] resuming from {resume} (iteration {start} of {iterations})", flush=True)
    signum = signals.agreed(accelerator.device)
    if signum:  # a signal while loading: nothing new to save
        raise faults.PreemptedError("ppo", start, signum, str(resume) if resume is not None else None)
    for model in (policy, ref, value):
        model.eval()  # dropout off: the update's log-probs must be those of the rollout (and generation)

    world, rank = accelerator.num_processes, accelerator.process_index
    local = cfg.rollout_batch_size // world
    chunk = cfg.generation_chunk or local
    bar = tqdm(desc="ppo", initial=start, total=iterations, disable=not accelerator.is_main_process)
    for it in range(start + 1, iterations + 1):
        # Every process draws the same global prompts and takes its share; each generation chunk is seeded by its
        # index in the global rollout, so with a fixed generation_chunk the samples do not depend on the world size.
        batch_prompts = [prompts[i] for i in sampler.next(cfg.rollout_batch_size)][rank * local: (rank + 1) * local]
        sampling = Sampling(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            seed=seed * 100003 + it)
        if hasattr(generator, "load_weights"):  # a vLLM engine samples from a copy: give it this iteration's policy
            generator.load_weights(accelerator.unwrap_model(policy))
        ro = collect(policy, ref, value, tokenizer, generator, score_fn, batch_prompts, sampling, kl_ctl.value, cfg,
                     generation_chunk=chunk, first_chunk=rank * local // chunk,
                     gather=(lambda t, pad: gather_rows(accelerator, t, pad)) if world > 1 else None)
        if hasattr(generator, "release"):  # a colocated vLLM engine may sleep through the update
            generator.release()
        metrics = rollout_metrics(ro, kl_ctl.value)
        shuffle = torch.Generator().manual_seed(seed * 100003 + it)
        metrics.update(ppo_update(policy, value, opt_policy, opt_value, ro, cfg, shuffle, accelerator))
        kl_ctl.update(metrics["kl"], cfg.rollout_batch_size)
        metrics["episodes"] = it * cfg.rollout_batch_size
        tracker.log(metrics, step=it)
        bar.update(1)

        def save() -> Path:
            return save_checkpoint(accelerator, ckpt_dir, it, policy, kl_ctl, sampler, metrics,
                                   snapshot_tokenizer=tokenizer if cfg.keep_snapshots else None)

        saved = save() if it % cfg.save_every == 0 or it == iterations else None
        if it == iterations:
            break
        signum = signals.agreed(accelerator.device)  # every process, once per iteration: all stop at the same one
        if signum:
            path = saved or save()
            bar.close()
            raise faults.PreemptedError("ppo", it, signum, str(path))
    bar.close()
    return {**metrics, "iterations": iterations}


def is_sharded(accelerator) -> bool:
    """FSDP: every process holds 1/N of each prepared model's weights; every forward pass is collective."""
    from prefopt.models.loading import sharded_weights

    return sharded_weights(accelerator) == "FSDP"


def gather_rows(accelerator, t: torch.Tensor, pad) -> torch.Tensor:
    """Every process's rows of a rollout tensor, in rank order, on every process (right padded to one width)."""
    if t.dim() == 2:
        t = accelerator.pad_across_processes(t, dim=1, pad_index=pad)
    return accelerator.gather(t)


# ---------------------------------------------------------------------------------------------------- the stage


def function_scorer(fn, rows: list[dict], rendered: list[str]):
    """A rollout ScoreFn from a reward function: each rendered prompt is mapped back to its prompt row."""
    by_prompt = {p: {**r, "prompt": p} for r, p in zip(rows, rendered)}

    def score(prompts: list[str], completions) -> torch.Tensor:
        return torch.tensor(fn([by_prompt[p] for p in prompts], [c.text for c in completions]))

    return score


def rm_score_fn(ctx, cfg, rows: list[dict], rendered: list[str], accelerator):
    """The reward model's ScoreFn, given each prompt in its `rm_format` (checked before the model loads). Under
    FSDP the reward model is sharded when `ppo.shard_reward_model` (every process scores the same number of
    equal batches, so its collective forward passes line up)."""
    from prefopt.scoring.scorer import load_scorer, rm_input_format, rm_prompt, scoring_length

    rm_path = ctx.resolve(cfg.reward_model)
    fmt = rm_input_format(cfg.rm_format, rm_path, "ppo.rm_format", cfg.reward_model.startswith("stage:"),
                          trust_remote_code=cfg.trust_remote_code)
    rm_prompts = {p: rm_prompt(r, p, fmt, "ppo.rm_format") for r, p in zip(rows, rendered)}
    length = scoring_length(rm_path, cfg.rm_max_length, "ppo.rm_max_length", cfg.trust_remote_code,
                            "ppo.trust_remote_code")
    with whole_on_every_process():  # on the CPU in its run dtype: place_frozen moves (or shards) it
        scorer = load_scorer(rm_path, cfg.trust_remote_code, key="ppo.trust_remote_code", device="cpu",
                             dtype=frozen_dtype(cfg) or (torch.bfloat16 if torch.cuda.is_available() else torch.float32))
    scorer.model = place_frozen(accelerator, scorer.model, cfg.shard_reward_model, "ppo.shard_reward_model")
    where = ""
    if is_sharded(accelerator):
        where = ", sharded (ppo.shard_reward_model)" if cfg.shard_reward_model else ", a full copy on each process"
    accelerator.print(f"[ppo] reward: the reward model {rm_path}, reading the "
                      f"{'policy' if fmt == 'policy' else 'its own chat'} format (ppo.rm_format: {cfg.rm_format})"
                      f"{where}", flush=True)
    return reward_model_scorer(scorer, batch_size=cfg.mini_batch_size, max_length=length, rm_prompts=rm_prompts)


def frozen_dtype(cfg) -> torch.dtype | None:
    """The frozen models' dtype: `ppo.frozen_dtype`, or for `auto` the launch's mixed precision (`accelerate launch`
    passes the config file's `mixed_precision` on as ACCELERATE_MIXED_PRECISION; `make_accelerator` itself trains in
    float32 whatever it says). None when neither names one: the reference is then float32 (exactly the policy's
    log-probs at step 0) and the reward model as `load_scorer` loads it."""
    name = cfg.frozen_dtype
    if name == "auto":
        launch = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        name = {"bf16": "bfloat16", "fp16": "float16"}.get(launch)
    return getattr(torch, name) if name else None


class whole_on_every_process:
    """Within: `from_pretrained` loads the whole weights on every process, even when the accelerate config's
    fsdp_cpu_ram_efficient_loading has only process 0 load them (the others get empty meta tensors, filled when
    FSDP2 shards the model). For a model that is not prepared by accelerate's FSDP2 (the reward model's scorer)."""

    KEY = "FSDP_CPU_RAM_EFFICIENT_LOADING"

    def __enter__(self):
        self.saved = os.environ.pop(self.KEY, None)

    def __exit__(self, *exc):
        if self.saved is not None:
            os.environ[self.KEY] = self.saved


def load_models(ctx, cfg):
    """(policy, reference, value model, tokenizer) on the CPU, for `train` to place: the policy and the value model
    in float32 for `prepare` to move (each process's device gets only its shard under FSDP2), the reference in the
    run's precision (`frozen_dtype`). Under FSDP2 with fsdp_cpu_ram_efficient_loading, processes other than 0 hold
    empty (meta) weights that sharding fills from process 0. A resumed run starts from these weights too;
    `accelerator.load_state` then puts the checkpoint's in."""
    from prefopt.models.loading import load_causal_lm, load_reward_model, load_tokenizer

    policy_path = ctx.resolve(cfg.policy)
    tok = load_tokenizer(policy_path, padding_side="right")
    # Trained models in float32 (AdamW on bf16 weights loses small updates). A float32 reference computes exactly
    # the policy's log-probs at step 0 (KL 0 before any update); a bf16 one (`frozen_dtype`) halves its memory and
    # gives KL of bf16 rounding there.
    policy = load_causal_lm(policy_path, dtype="float32")
    ref_dtype = str(frozen_dtype(cfg) or torch.float32).removeprefix("torch.")
    if cfg.shard_reference:
        ref = load_causal_lm(policy_path, dtype=ref_dtype)  # a second load of the checkpoint, never a policy copy
    else:
        with whole_on_every_process():
            ref = load_causal_lm(policy_path, dtype=ref_dtype)
    for p in ref.parameters():
        p.requires_grad_(False)
    from_rm = cfg.value_init == "reward" and not cfg.reward_fn
    value_src = ctx.resolve(cfg.reward_model) if from_rm else policy_path
    remote = cfg.trust_remote_code and from_rm  # the setting is about the reward model's code only
    if value_src != policy_path and load_tokenizer(value_src, trust_remote_code=remote).get_vocab() != tok.get_vocab():
        # The value model reads the policy's token ids: another vocabulary would be read as garbage, silently.
        raise ConfigError(f"ppo.value_init: reward, but the reward model {value_src} has another tokenizer than the "
                          f"policy {policy_path}: the value model reads the policy's tokens (use ppo.value_init: "
                          "policy)")
    seq_cls = load_reward_model(value_src, trust_remote_code=remote).float()
    head = getattr(seq_cls, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        # The value model applies the reward head at every position; a hub model with another head (ArmoRM's
        # gated multi-objective regression) has none to apply.
        raise ConfigError(f"ppo.value_init: reward, but the reward model {value_src} ({type(seq_cls).__name__}) has "
                          "no scalar `score` head to read per token (use ppo.value_init: policy)")
    value = ValueModel(seq_cls)
    if value.model.config.vocab_size < len(tok):
        raise ValueError(f"value model from {value_src} has vocab {value.model.config.vocab_size} < the policy "
                         f"tokenizer's {len(tok)}: it must read the policy's tokens (use value_init: policy)")
    return policy, ref, value, tok


def check_distributed_type(accelerator) -> None:
    """PPO trains two models (policy and value) with their own optimizers and generates from the policy between
    updates. It runs on one process, under DDP, and under FSDP2 (sharded policy, value and, as the config says,
    reference and reward model; synced generation). FSDP1 and DeepSpeed are refused before any weights load:
    FSDP1 wraps models in a class whose generate() does not gather the weights, and DeepSpeed wants one engine
    per trained model, which this loop does not build."""
    from accelerate.utils import DistributedType

    dt = accelerator.distributed_type
    if dt in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return
    if dt == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version == 2:
        return
    what = "FSDP version 1" if dt == DistributedType.FSDP else dt.value
    raise ConfigError(f"ppo runs on one process, under DDP or under FSDP2; this launch is {what} (the "
                      "launch.accelerate_config file): use experiments/accelerate/fsdp2.yaml or ddp.yaml for the "
                      "ppo stage")


def run(ctx) -> dict:
    """From the first load to the final save, SIGTERM / SIGINT / SIGUSR1 stop at an iteration's end (`train`); one
    during the final save lets it finish."""
    with faults.StopSignals(ctx.stage) as signals:
        return _run(ctx, signals)


def _run(ctx, signals: faults.StopSignals) -> dict:
    from prefopt.data.loaders import load_prompts
    from prefopt.data.templates import render_prompt
    from prefopt.preference.loop import save_policy
    from prefopt.dist.process import seed_everything

    cfg = ctx.section
    accelerator = make_accelerator()
    check_distributed_type(accelerator)
    check_world(cfg, accelerator.num_processes)
    if not cfg.reward_fn:  # a reward model that needs its own code, found before any weights load
        from prefopt.scoring.scorer import reward_model_config
        from prefopt.scoring.likelihood import read_meta

        rm_path = ctx.resolve(cfg.reward_model)
        if not (Path(rm_path).is_dir() and read_meta(rm_path)):
            reward_model_config(rm_path, cfg.trust_remote_code, "ppo.trust_remote_code")
    seed_everything(ctx.seed)
    ckpt_dir = ctx.dir / "checkpoints"
    resume = resumable_checkpoint(accelerator, ckpt_dir)
    policy, ref, value, tok = load_models(ctx, cfg)

    rows = load_prompts(cfg.prompts, cfg.template, resolve=lambda p: ctx.resolve(p, model=False)).rows
    prompts = [render_prompt(r["prompt"], tok) for r in rows]
    if cfg.reward_fn:
        from prefopt.scoring.functions import load_reward_function

        score_fn = function_scorer(load_reward_function(cfg.reward_fn, ctx.cfg.task), rows, prompts)
        accelerator.print(f"[ppo] reward: the function {cfg.reward_fn} (value model from the policy)", flush=True)
    else:
        score_fn = rm_score_fn(ctx, cfg, rows, prompts, accelerator)

    def build_generator(prepared_policy):  # called by train() once the models are placed
        return rollout_generator(ctx, cfg, prepared_policy, tok, accelerator, prompts)

    last = train(policy, ref, value, tok, prompts, score_fn, build_generator, cfg, ctx.seed, ckpt_dir, ctx.tracker,
                 resume=resume, accelerator=accelerator, signals=signals)
    with faults.writing(ctx.dir / "model"):
        save_policy(accelerator, policy, tok, ctx.dir / "model", lora=False)
    accelerator.wait_for_everyone()
    return {
        "reward": last.get("reward"),
        "kl": last.get("kl"),
        "kl_coef": last.get("kl_coef"),
        "length": last.get("length"),
        "iterations": last["iterations"],
        "episodes": last["iterations"] * cfg.rollout_batch_size,
        "prompts": len(prompts),
        "processes": accelerator.num_processes,
    }


def rollout_generator(ctx, cfg, policy, tok, accelerator, prompts: list[str]):
    """What samples the rollouts: transformers `generate` on the policy being trained, or (`ppo.backend: vllm`, GPU
    machines) a vLLM engine beside it on each process, given the policy's weights before every rollout."""
    if cfg.backend == "transformers":
        from prefopt.generation.hf import TransformersGenerator

        # Under FSDP each decoding step is a collective forward pass: synced generation keeps a process whose
        # responses all ended stepping (without sampling) until every process's have.
        return TransformersGenerator(policy, tokenizer=tok, batch_size=cfg.rollout_batch_size,
                                     synced=is_sharded(accelerator))
    from prefopt.generation.vllm_backend import VLLMGenerator

    from prefopt.data.templates import encode

    # The engine starts from the checkpoint (in its saved dtype, as the other backends) and is given the trained
    # policy's weights before every rollout (train() calls load_weights). Its context is cut to the longest prompt
    # plus the response cap, so the KV cache it reserves beside training is no larger than PPO can use.
    longest = max(len(encode(p, tok)) for p in prompts)
    # Always colocated (external_launcher), one process too: only then does vLLM keep the model in this process,
    # where load_weights can reach it (TRL does the same). A lone process gets the launch variables it needs.
    if accelerator.num_processes == 1:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())}.items():
            os.environ.setdefault(key, value)
    return VLLMGenerator(ctx.resolve(cfg.policy), gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                         seed=ctx.seed, colocate=True, max_model_len=longest + cfg.max_new_tokens,
                         enable_sleep_mode=cfg.vllm_sleep)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
