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
iterations (policy, value, optimizers, KL controller, RNG and sampler state; the latest two are kept). A killed run
resumes from the latest checkpoint and continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prefopt.config import ConfigError
from prefopt.generation.base import Sampling
from prefopt.logps import masked_mean
from prefopt.ppo.loss import AdaptiveKLController, FixedKLController, explained_variance, policy_loss, value_loss
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


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete `iter-N` folder (written under a temporary name and renamed, so complete if present)."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("iter-*") if p.name.split("-")[1].isdigit() and (p / "state.pt").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(folder: Path, iteration: int, policy, value, opt_policy, opt_value, kl_ctl, sampler,
                    last_metrics: dict, snapshot_tokenizer=None) -> Path:
    """A resumable checkpoint `iter-N`; with `snapshot_tokenizer`, also a loadable policy `../snapshots/iter-N`."""
    out = folder / f"iter-{iteration}"
    tmp = folder / f".iter-{iteration}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp / "policy", safe_serialization=True)
    value.save_pretrained(tmp / "value", safe_serialization=True)
    torch.save({
        "iteration": iteration,
        "optimizer/policy": opt_policy.state_dict(),
        "optimizer/value": opt_value.state_dict(),
        "kl_controller": kl_ctl.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "last_metrics": last_metrics,
    }, tmp / "state.pt")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    done = sorted(folder.glob("iter-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    if snapshot_tokenizer is not None:
        snap = folder.parent / "snapshots" / f"iter-{iteration}"
        tmp_snap = snap.with_name(f".{snap.name}.partial")
        if tmp_snap.exists():
            shutil.rmtree(tmp_snap)
        shutil.copytree(out / "policy", tmp_snap)
        snapshot_tokenizer.save_pretrained(tmp_snap)
        if snap.exists():
            shutil.rmtree(snap)
        os.replace(tmp_snap, snap)
    return out


def load_state(ckpt: Path) -> dict:
    # Our own file: optimizer states and RNG tuples need the full unpickler.
    return torch.load(ckpt / "state.pt", weights_only=False)


def restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---------------------------------------------------------------------------------------------------- the loop


def ppo_update(policy, value, opt_policy, opt_value, ro, cfg, generator: torch.Generator) -> dict:
    """`ppo_epochs` passes over shuffled minibatches of one rollout; returns the mean of each loss metric."""
    batch, B = ro.batch(), ro.input_ids.shape[0]
    sums: dict[str, float] = {}
    n = 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=generator).to(ro.input_ids.device)
        for start in range(0, B, cfg.mini_batch_size):
            mb = trim(batch, perm[start: start + cfg.mini_batch_size])
            logps, _ = policy_forward(policy, mb["input_ids"], mb["attention_mask"], mb["mask"], cfg.temperature)
            values = value(mb["input_ids"], mb["attention_mask"])[:, :-1]
            pg_loss, pg_metrics = policy_loss(logps, mb["logps"], mb["advantages"], mb["mask"], cfg.cliprange)
            vf_loss, vf_metrics = value_loss(values, mb["values"], mb["returns"], mb["mask"], cfg.cliprange_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            opt_policy.zero_grad(set_to_none=True)
            opt_value.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(value.parameters(), cfg.max_grad_norm)
            opt_policy.step()
            opt_value.step()
            step = {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), **pg_metrics, **vf_metrics}
            for k, v in step.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
    return {k: v / n for k, v in sums.items()}


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


def train(policy, ref, value, tokenizer, prompts: list[str], score_fn, generator, cfg, seed: int,
          ckpt_dir: Path, tracker, resume: Path | None = None) -> dict:
    """The PPO loop over `total_episodes // rollout_batch_size` iterations; returns the last iteration's metrics.

    `score_fn(prompts, completions) -> (B,)` is the reward (the reward model in `run`); `generator` samples from
    the in-memory policy. With `resume`, optimizers, KL controller, sampler and RNG continue from that checkpoint
    (whose policy and value weights the caller loaded)."""
    ckpt_dir = Path(ckpt_dir)
    opt_policy = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0)
    opt_value = torch.optim.AdamW(value.parameters(), lr=cfg.value_learning_rate, eps=1e-5, weight_decay=0.0)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
              else FixedKLController(cfg.kl_coef))
    sampler = PromptSampler(len(prompts), seed)
    iterations = max(1, cfg.total_episodes // cfg.rollout_batch_size)
    start, metrics = 0, {}
    if resume is not None:
        state = load_state(resume)
        opt_policy.load_state_dict(state["optimizer/policy"])
        opt_value.load_state_dict(state["optimizer/value"])
        kl_ctl.load_state_dict(state["kl_controller"])
        sampler.load_state_dict(state["sampler"])
        restore_rng(state["rng"])
        start, metrics = state["iteration"], state["last_metrics"]
        print(f"[ppo] resuming from {resume} (iteration {start} of {iterations})", flush=True)
    for model in (policy, ref, value):
        model.eval()  # dropout off: the update's log-probs must be those of the rollout (and generation)

    for it in tqdm(range(start + 1, iterations + 1), desc="ppo", initial=start, total=iterations):
        batch_prompts = [prompts[i] for i in sampler.next(cfg.rollout_batch_size)]
        sampling = Sampling(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            seed=seed * 100003 + it)
        ro = collect(policy, ref, value, tokenizer, generator, score_fn, batch_prompts, sampling, kl_ctl.value, cfg)
        metrics = rollout_metrics(ro, kl_ctl.value)
        shuffle = torch.Generator().manual_seed(seed * 100003 + it)
        metrics.update(ppo_update(policy, value, opt_policy, opt_value, ro, cfg, shuffle))
        kl_ctl.update(metrics["kl"], cfg.rollout_batch_size)
        metrics["episodes"] = it * cfg.rollout_batch_size
        tracker.log(metrics, step=it)
        if it % cfg.save_every == 0 or it == iterations:
            save_checkpoint(ckpt_dir, it, policy, value, opt_policy, opt_value, kl_ctl, sampler, metrics,
                            snapshot_tokenizer=tokenizer if cfg.keep_snapshots else None)
    return {**metrics, "iterations": iterations}


# ---------------------------------------------------------------------------------------------------- the stage


def function_scorer(fn, rows: list[dict], rendered: list[str]):
    """A rollout ScoreFn from a reward function: each rendered prompt is mapped back to its prompt row."""
    by_prompt = {p: {**r, "prompt": p} for r, p in zip(rows, rendered)}

    def score(prompts: list[str], completions) -> torch.Tensor:
        return torch.tensor(fn([by_prompt[p] for p in prompts], [c.text for c in completions]))

    return score


def rm_score_fn(ctx, cfg, rows: list[dict], rendered: list[str], device):
    """The reward model's ScoreFn, given each prompt in its `rm_format` (checked before the model loads)."""
    from prefopt.reward.score import load_scorer, rm_input_format, rm_prompt

    rm_path = ctx.resolve(cfg.reward_model)
    fmt = rm_input_format(cfg.rm_format, rm_path, "ppo.rm_format", cfg.reward_model.startswith("stage:"))
    rm_prompts = {p: rm_prompt(r, p, fmt, "ppo.rm_format") for r, p in zip(rows, rendered)}
    scorer = load_scorer(rm_path)
    scorer.model.to(device)
    print(f"[ppo] reward: the reward model {rm_path}, reading the {'policy' if fmt == 'policy' else 'its own chat'} "
          f"format (ppo.rm_format: {cfg.rm_format})", flush=True)
    return reward_model_scorer(scorer, batch_size=cfg.mini_batch_size, rm_prompts=rm_prompts)


def load_models(ctx, cfg, resume: Path | None):
    """(policy, reference, value model, tokenizer) on the training device; weights from `resume` when given."""
    from prefopt.models import load_causal_lm, load_reward_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy_path = ctx.resolve(cfg.policy)
    tok = load_tokenizer(policy_path, padding_side="right")
    # Trained models in float32 (AdamW on bf16 weights loses small updates). The reference in float32 too: it
    # must compute exactly the policy's log-probs at step 0, and a bf16 reference beside an fp32 policy would
    # give KL > 0 before any update (the upcast of bf16 weights is exact, so fp32 both sides agree to the bit).
    policy = load_causal_lm(str(resume / "policy") if resume else policy_path, dtype="float32")
    ref = load_causal_lm(policy_path, dtype="float32")  # a second load of the checkpoint, never a copy of the policy
    for p in ref.parameters():
        p.requires_grad_(False)
    value_src = ctx.resolve(cfg.reward_model) if cfg.value_init == "reward" and not cfg.reward_fn else policy_path
    if value_src != policy_path and load_tokenizer(value_src).get_vocab() != tok.get_vocab():
        # The value model reads the policy's token ids: another vocabulary would be read as garbage, silently.
        raise ConfigError(f"ppo.value_init: reward, but the reward model {value_src} has another tokenizer than the "
                          f"policy {policy_path}: the value model reads the policy's tokens (use ppo.value_init: "
                          "policy)")
    value = ValueModel(load_reward_model(str(resume / "value") if resume else value_src).float())
    if value.model.config.vocab_size < len(tok):
        raise ValueError(f"value model from {value_src} has vocab {value.model.config.vocab_size} < the policy "
                         f"tokenizer's {len(tok)}: it must read the policy's tokens (use value_init: policy)")
    return policy.to(device), ref.to(device), value.to(device), tok


def check_single_process(world_size: int) -> None:
    """This PPO loop has no process group: under `accelerate launch --num_processes N` it would train N
    independent policies and save one of them. Refused before any model is loaded; `prefopt run` launches this
    stage with one process whatever `launch.num_processes` says (pipeline.SINGLE_PROCESS_STAGES)."""
    if world_size > 1:
        raise ConfigError(f"ppo runs on one process, but it was launched with {world_size} (WORLD_SIZE): each would "
                          "train its own policy; launch it with --num_processes 1, or through `prefopt run`, which "
                          "does whatever launch.num_processes says")


def run(ctx) -> dict:
    from prefopt.data.loaders import load_prompts
    from prefopt.data.templates import render_prompt
    from prefopt.generation.hf import TransformersGenerator
    from prefopt.models import save_model
    from prefopt.utils import seed_everything

    cfg = ctx.section
    check_single_process(int(os.environ.get("WORLD_SIZE", "1")))
    seed_everything(ctx.seed)
    ckpt_dir = ctx.dir / "checkpoints"
    resume = latest_checkpoint(ckpt_dir)
    policy, ref, value, tok = load_models(ctx, cfg, resume)

    rows = load_prompts(cfg.prompts, cfg.template, resolve=lambda p: ctx.resolve(p, model=False)).rows
    prompts = [render_prompt(r["prompt"], tok) for r in rows]
    if cfg.reward_fn:
        from prefopt.reward.functions import load_reward_function

        score_fn = function_scorer(load_reward_function(cfg.reward_fn, ctx.cfg.task), rows, prompts)
        print(f"[ppo] reward: the function {cfg.reward_fn} (value model from the policy)", flush=True)
    else:
        score_fn = rm_score_fn(ctx, cfg, rows, prompts, next(policy.parameters()).device)
    generator = TransformersGenerator(policy, tokenizer=tok, batch_size=cfg.rollout_batch_size)

    last = train(policy, ref, value, tok, prompts, score_fn, generator, cfg, ctx.seed, ckpt_dir, ctx.tracker,
                 resume=resume)
    if ctx.is_main:
        save_model(policy, tok, ctx.dir / "model")
    return {
        "reward": last.get("reward"),
        "kl": last.get("kl"),
        "kl_coef": last.get("kl_coef"),
        "length": last.get("length"),
        "iterations": last["iterations"],
        "episodes": last["iterations"] * cfg.rollout_batch_size,
        "prompts": len(prompts),
    }
