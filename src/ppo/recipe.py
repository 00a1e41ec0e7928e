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
as `.iter-N.partial/`, its files' SHA-256 recorded in `manifest.json` (prefopt.runtime.faults), then renamed into
place (ppo/checkpoint.py). A killed run resumes from the newest checkpoint whose manifest verifies (the previous
one, with a line naming the bad file, if the newest is damaged; the stage starts over, with a line, if none is) and
continues exactly as an uninterrupted one would.

Preemption (prefopt.runtime.faults): SIGTERM, SIGINT or SIGUSR1 let the current iteration finish its update; every
process agrees on the signal at the iteration's end, a checkpoint of that iteration is saved, and the stage ends with
PreemptedError (exit 143, one line). A signal during the final save lets it finish.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from prefopt.config import ConfigError
from prefopt.generation.base import Sampling
from prefopt.models.loading import place_frozen
from prefopt.ppo.checkpoint import load_trainer_state, resumable_checkpoint, save_checkpoint
from prefopt.ppo.loss import AdaptiveKLController, FixedKLController, explained_variance, ppo_loss
from prefopt.models import varlen
from prefopt.ppo.rollout import (PromptSampler, Rollout, collect, gather_rows, policy_forward, trim, tree_batch,
                                 value_forward)
from prefopt.ppo.setup import (check_distributed_type, check_reward_model_code, check_world, is_sharded,
                               load_models, make_accelerator, reward_scorer, rollout_generator)
from prefopt.runtime import faults
from prefopt.training import throughput
from prefopt.training.logps import masked_mean


@faults.handled(faults.StopSignals)
def run(ctx, signals: faults.StopSignals) -> dict:
    """Setup (the launch, the checkpoint to resume from, the models, the prompts and the reward), `train`, and the
    final save. From the first load to the final save, SIGTERM / SIGINT / SIGUSR1 stop at an iteration's end
    (`train`); one during the final save lets it finish."""
    from prefopt.data.loaders import load_prompts
    from prefopt.data.templates import render_prompt
    from prefopt.dist.process import seed_everything

    cfg = ctx.section
    accelerator = make_accelerator()
    check_distributed_type(accelerator)
    check_world(cfg, accelerator.num_processes)
    if not cfg.reward_fn:  # a reward model that needs its own code, found before any weights load
        check_reward_model_code(ctx, cfg)
    seed_everything(ctx.seed)
    ckpt_dir = ctx.dir / "checkpoints"
    resume = resumable_checkpoint(accelerator, ckpt_dir)
    policy, ref, value, tok = load_models(ctx, cfg)
    rows = load_prompts(cfg.prompts, cfg.template, resolve=lambda p: ctx.resolve(p, model=False), tokenizer=tok).rows
    prompts = [render_prompt(r["prompt"], tok) for r in rows]
    score_fn = reward_scorer(ctx, cfg, rows, prompts, accelerator)

    def build_generator(prepared_policy):  # called by train() once the models are placed
        return rollout_generator(ctx, cfg, prepared_policy, tok, accelerator, prompts)

    last = train(policy, ref, value, tok, prompts, score_fn, build_generator, cfg, ctx.seed, ckpt_dir, ctx.tracker,
                 resume=resume, accelerator=accelerator, signals=signals)
    save_final(accelerator, policy, tok, ctx.dir / "model")
    return {
        "reward": last.get("reward"),
        "kl": last.get("kl"),
        "kl_coef": last.get("kl_coef"),
        "length": last.get("length"),
        "iterations": last["iterations"],
        "episodes": last["iterations"] * cfg.rollout_batch_size,
        "prompts": len(prompts),
        "processes": accelerator.num_processes,
        **{k: v for k, v in last.items() if k.startswith("perf/")},
    }


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
    policy, ref, value, opt_policy, opt_value, generator = place(policy, ref, value, generator, cfg, accelerator)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
              else FixedKLController(cfg.kl_coef))
    sampler = PromptSampler(len(prompts), seed)
    iterations = max(1, cfg.total_episodes // cfg.rollout_batch_size)
    start, metrics = resume_from(resume, accelerator, kl_ctl, sampler, iterations)
    signum = signals.agreed(accelerator.device)
    if signum:  # a signal while loading: nothing new to save
        raise faults.PreemptedError("ppo", start, signum, str(resume) if resume is not None else None)
    for model in (policy, ref, value):
        model.eval()  # dropout off: the update's log-probs must be those of the rollout (and generation)
    meter = throughput.start(0.0, accelerator.device, torch.float32, accelerator.num_processes)
    n_policy, n_value = (meter.params(m) for m in (policy, value))
    gather = throughput.accelerator_gather(accelerator)  # the rows' throughput windows, over every process

    bar = tqdm(desc="ppo", initial=start, total=iterations, disable=not accelerator.is_main_process)
    for it in range(start + 1, iterations + 1):
        with meter.timed("forward"):  # PPO's forward phase: the whole rollout, sampling included
            ro = rollout(it, policy, ref, value, tokenizer, prompts, sampler, generator, score_fn, kl_ctl.value, cfg,
                         seed, accelerator)
        count_rollout(meter, ro.computed, policy, ref, value)
        metrics = rollout_metrics(ro, kl_ctl.value)
        shuffle = torch.Generator().manual_seed(seed * 100003 + it)
        with meter.timed("train"):
            metrics.update(ppo_update(policy, value, opt_policy, opt_value, ro, cfg, shuffle, accelerator,
                                      meter=meter, n_params=(n_policy[0] + n_value[0], n_policy[1] + n_value[1]),
                                      attention=[meter.attention(policy), meter.attention(value)]))
        kl_ctl.update(metrics["kl"], cfg.rollout_batch_size)
        metrics["episodes"] = it * cfg.rollout_batch_size
        tracker.log({**metrics, **meter.window(gather)}, step=it)  # and the iteration's throughput
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
    perf = meter.gathered_summary(gather)  # into summary.json, and W&B's run summary through the tracker
    accelerator.print(f"[prefopt] ppo: {throughput.describe(perf)}", flush=True)
    return {**metrics, "iterations": iterations, **perf}


# ---------------------------------------------------------------------------------------------------- setup


def place(policy, ref, value, generator, cfg, accelerator):
    """(policy, ref, value, policy optimizer, value optimizer, generator), placed: the trained models and their
    AdamW prepared by accelerate, the frozen reference by `place_frozen`, and the rollout generator built now when
    `generator` is a function of the prepared policy (vLLM's share of the GPU comes after the models)."""
    # foreach: the multi-tensor update (torch's default on GPUs) instead of its per-tensor loop on CPU, 5% of the
    # quickstart's PPO stage; the same weights to the bit (a 4-iteration run compared; fused=True is not: it differs)
    opt_policy = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0,
                                   foreach=True)
    opt_value = torch.optim.AdamW(value.parameters(), lr=cfg.value_learning_rate, eps=1e-5, weight_decay=0.0,
                                  foreach=True)
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
    return policy, ref, value, opt_policy, opt_value, generator


def resume_from(resume: Path | None, accelerator, kl_ctl, sampler, iterations: int) -> tuple[int, dict]:
    """(iterations done, their last metrics): (0, {}) for a fresh start; with `resume`, the models, optimizers and
    RNG (accelerate's state), the KL controller and the sampler are put back as that checkpoint saved them."""
    if resume is None:
        return 0, {}
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
    accelerator.print(f"[ppo] resuming from {resume} (iteration {state['iteration']} of {iterations})", flush=True)
    return state["iteration"], state["last_metrics"]


# ---------------------------------------------------------------------------------------------------- rollout


def rollout(it: int, policy, ref, value, tokenizer, prompts: list[str], sampler, generator, score_fn,
            kl_coef: float, cfg, seed: int, accelerator) -> Rollout:
    """Iteration `it`'s rollout: one response per prompt of this process's share, scored, with log-probs, values,
    rewards and whitened advantages over the whole (gathered) rollout."""
    world, rank = accelerator.num_processes, accelerator.process_index
    local = cfg.rollout_batch_size // world
    chunk = cfg.generation_chunk or local
    # Every process draws the same global prompts and takes its share; each generation chunk is seeded by its
    # index in the global rollout, so with a fixed generation_chunk the samples do not depend on the world size.
    batch_prompts = [prompts[i] for i in sampler.next(cfg.rollout_batch_size)][rank * local: (rank + 1) * local]
    sampling = Sampling(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                        seed=seed * 100003 + it)
    if hasattr(generator, "load_weights"):  # a vLLM engine samples from a copy: give it this iteration's policy
        generator.load_weights(accelerator.unwrap_model(policy))
    ro = collect(policy, ref, value, tokenizer, generator, score_fn, batch_prompts, sampling, kl_coef, cfg,
                 generation_chunk=chunk, first_chunk=rank * local // chunk,
                 gather=(lambda t, pad: gather_rows(accelerator, t, pad)) if world > 1 else None)
    if hasattr(generator, "release"):  # a colocated vLLM engine may sleep through the update
        generator.release()
    return ro


def rollout_metrics(ro, kl_coef: float) -> dict:
    """What the rollout says of the policy: its score, the KL to the reference, entropy, value fit, lengths."""
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


# ---------------------------------------------------------------------------------------------------- update


def count_rollout(meter, computed: dict, policy, ref, value) -> None:
    """A rollout's passes as the meter's `forward` phase: the positions each of the policy's, the reference's and
    the value model's passes computed (`Rollout.computed`), and the FLOPs of sampling (about one policy forward over
    this process's real tokens) and of those three passes. The reward model's pass over its own tokenization is
    not counted."""
    meter.add("forward", computed["positions"], computed["useful"], 0.0)
    meter.count_flops("forward", computed["sampled"], policy)
    for batch in computed["batches"]:
        for model in (policy, ref, value):
            meter.count_flops("forward", batch, model)


def ppo_update(policy, value, opt_policy, opt_value, ro, cfg, generator: torch.Generator, accelerator, meter=None,
               n_params: tuple[int, int] = (0, 0), attention: list | None = None) -> dict:
    """`ppo_epochs` passes over shuffled minibatches of one (global, gathered) rollout; returns the mean of each
    loss metric over the global minibatches.

    Every process holds the whole rollout and draws the same permutation; of each minibatch of `mini_batch_size`
    rows, process r trains on the r-th equal share. Each process's loss is weighted by its share of the
    minibatch's response tokens, so the averaged gradient is that of the token mean over the whole minibatch,
    what one process computes on the same rows. `meter` counts each minibatch's tokens as trained by models of
    `n_params` (non-embedding, trainable) parameters: the policy's and the value model's together; `attention`
    their attention's shapes (`Meter.attention`)."""
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
            rows = mb["input_ids"], mb["attention_mask"], mb["mask"]
            tree = tree_batch(*rows) if varlen.reads_pieces(policy) else None  # shared prompt tokens once
            if meter is not None:
                meter.count("train", tree if tree is not None else mb, *n_params, attention)
            logps, _ = policy_forward(policy, *rows, cfg.temperature, tree)
            values = value_forward(value, *rows, tree)
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


def global_token_weight(mask: torch.Tensor, local_idx: torch.Tensor, global_idx: torch.Tensor,
                        num_processes: int) -> torch.Tensor:
    """The factor that turns a token mean over this process's rows of a minibatch into its share of the token
    mean over the whole (global) minibatch: n_local / N_global * num_processes (DDP then averages the gradients
    over processes, dividing by num_processes). Exactly 1 on one process, so the one-process loss is unchanged."""
    return mask[local_idx].sum() / mask[global_idx].sum() * num_processes


# ---------------------------------------------------------------------------------------------------- save


def save_final(accelerator, policy, tokenizer, out: Path) -> None:
    """The trained policy and its tokenizer in `out` (the stage's `model/`), written whole. Collective."""
    from prefopt.preference.loop import save_policy

    with faults.writing(out):
        save_policy(accelerator, policy, tokenizer, out, lora=False)
    accelerator.wait_for_everyone()
