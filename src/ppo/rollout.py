"""PPO's data side: the value model, the prompt sampler, batching prompt + response tokens, and collecting one scored
rollout (gathered over processes).

Layout of a rollout batch: each row is `prompt tokens + response tokens`, right padded to T. Per-token tensors
are (B, T-1): position t holds what belongs to the action input_ids[t+1] (its log-prob, the value of the state
before it, its reward), and `mask` is 1 where input_ids[t+1] is a response token. Right padding keeps position
ids natural, so prefopt.training.logps' conventions hold unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from prefopt.data.templates import encode_many
from prefopt.generation.base import Completion, Sampling, derive_seed
from prefopt.training.logps import token_logps
from prefopt.training.padding import right_pad
from prefopt.ppo.loss import gae, kl_penalty_rewards, whiten


class ValueModel(nn.Module):
    """V(s_t) for every position: a sequence-classification model's backbone with its scalar head applied per token.

    Built from `load_reward_model(path)`: from the reward model itself (InstructGPT initialises the value function
    from the RM) or from the policy checkpoint (a fresh head on the policy's backbone). It must share the policy's
    tokenizer, since it reads the policy's tokens."""

    def __init__(self, seq_cls_model):
        super().__init__()
        self.model = seq_cls_model  # the only registered child: each weight has one name in state dicts

    @property
    def _no_split_modules(self):  # what FSDP wraps by default when the accelerate config names no layer class
        return getattr(self.model, "_no_split_modules", None)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.model, self.model.base_model_prefix)

    @property
    def head(self) -> nn.Module:
        return self.model.score  # Linear(hidden, 1): the reward head, read at every position

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.head(hidden).squeeze(-1).float()  # (B, T)

    def save_pretrained(self, path, **kwargs) -> None:
        self.model.save_pretrained(path, **kwargs)


def build_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response rows: input_ids, attention_mask (B, T) and the action mask (B, T-1)."""
    input_ids, attention_mask = right_pad([p + r for p, r in zip(prompt_ids, response_ids)], pad_id)
    response = torch.zeros(input_ids.shape, dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        response[i, len(p): len(p) + len(r)] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mask": response[:, 1:]}


def policy_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies (B, T-1) of the response tokens, at the sampling temperature.

    The logits are divided by the temperature the responses were sampled at, so log pi is the log-prob of the
    distribution that produced them (Huang et al. 2024); zero outside `mask`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, V)
    logits = logits / temperature
    logps = token_logps(logits, input_ids[:, 1:]) * mask
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1) * mask
    return logps, entropy


def trim(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows `idx` of a batch, cut to their longest row (right padding: the cut columns are padding only)."""
    T = int(batch["attention_mask"][idx].sum(1).max())
    out = {}
    for k, v in batch.items():
        width = T if v.shape[1] == batch["attention_mask"].shape[1] else T - 1
        out[k] = v[idx, :width]
    return out


@dataclass
class Rollout:
    """One batch of episodes with everything PPO's update needs (per-token tensors are (B, T-1))."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    scores: torch.Tensor
    """Reward-model score (B,), before the missing-EOS penalty."""
    finished: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def batch(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name).dim() == 2}


ScoreFn = Callable[[list[str], list[Completion]], torch.Tensor]


def reward_model_scorer(scorer, batch_size: int = 64, max_length: int = 1024,
                        rm_prompts: dict[str, str | list[dict]] | None = None) -> ScoreFn:
    """Scores (prompt, response) as the `score` stage does, with a `scoring.scorer.load_scorer` scorer (a classifier
    or a likelihood reward model).

    The reward model gets the response as decoded text, never the policy's token ids: it tokenizes with its own
    tokenizer, whose vocabulary may differ. `rm_prompts` maps each rendered prompt to what the reward model is given
    instead (`scoring.scorer.rm_prompt`: the raw chat turns for `rm_format: chat`); None: the rendered prompt."""

    def score(prompts: list[str], completions: list[Completion]) -> torch.Tensor:
        given = prompts if rm_prompts is None else [rm_prompts[p] for p in prompts]
        return torch.tensor(scorer.score(given, [c.text for c in completions], batch_size, max_length))

    return score


def sample(generator, prompts: list[str], sampling: Sampling, chunk: int = 0, first_chunk: int = 0) -> list[Completion]:
    """One response per prompt, generated `chunk` prompts at a time (0: all at once). Chunk j is sampled under a
    seed of its global index first_chunk + j (the first global chunk under `sampling.seed` itself), so a rollout
    split over processes in whole chunks samples exactly what one process sampling every chunk would."""
    chunk = chunk or len(prompts)
    out: list[Completion] = []
    for j, start in enumerate(range(0, len(prompts), chunk)):
        c = first_chunk + j
        seed = sampling.seed if c == 0 else derive_seed(sampling.seed, c)
        out += [comps[0] for comps in generator.generate(prompts[start:start + chunk], replace(sampling, seed=seed))]
    return out


Gather = Callable[[torch.Tensor, int | float], torch.Tensor]


@torch.no_grad()
def collect(policy, ref, value, tokenizer, generator, score_fn: ScoreFn, prompts: list[str], sampling: Sampling,
            kl_coef: float, cfg, generation_chunk: int = 0, first_chunk: int = 0,
            gather: Gather | None = None) -> Rollout:
    """Sample one response per prompt, score it, and compute log-probs, values, rewards and advantages.

    `cfg` is the PPOConfig (missing_eos_penalty, whiten_rewards, gamma, lam, mini_batch_size). With `gather`
    (several processes: `gather(tensor, pad_value)` returns every process's rows, in rank order), this process
    samples, scores and runs the forward passes for its own prompts, and the rewards, GAE and whitening are
    computed over the gathered global rollout, exactly as one process would compute them."""
    device = next(policy.parameters()).device
    completions = sample(generator, prompts, sampling, generation_chunk, first_chunk)
    prompt_ids = encode_many(prompts, tokenizer)  # as the generator tokenized them: one BOS
    # An empty response (a backend that drops a lone EOS) still needs one action to carry the score.
    response_ids = [list(c.token_ids)[: sampling.max_new_tokens] or [tokenizer.eos_token_id] for c in completions]
    batch = {k: v.to(device) for k, v in build_batch(prompt_ids, response_ids, tokenizer.pad_token_id).items()}
    finished = torch.tensor([c.finished for c in completions], dtype=torch.float32, device=device)
    scores = score_fn(prompts, completions).float().to(device)

    # Forward passes in chunks of mini_batch_size rows: the rollout can be larger than fits at once.
    chunks = {k: [] for k in ("logps", "ref_logps", "entropy", "values")}
    for start in range(0, len(prompts), cfg.mini_batch_size):
        idx = torch.arange(start, min(start + cfg.mini_batch_size, len(prompts)), device=device)
        ids, am, m = batch["input_ids"][idx], batch["attention_mask"][idx], batch["mask"][idx]
        logps, entropy = policy_forward(policy, ids, am, m, sampling.temperature)
        ref_logps, _ = policy_forward(ref, ids, am, m, sampling.temperature)
        chunks["logps"].append(logps)
        chunks["entropy"].append(entropy)
        chunks["ref_logps"].append(ref_logps)
        chunks["values"].append(value(ids, am)[:, :-1] * m)
    t = {k: torch.cat(v) for k, v in chunks.items()}
    t.update(batch, scores=scores, finished=finished)
    if gather is not None:
        t = {k: gather(v, tokenizer.pad_token_id if k == "input_ids" else 0) for k, v in t.items()}
    return score_rollout(t, kl_coef, cfg)


def score_rollout(t: dict[str, torch.Tensor], kl_coef: float, cfg) -> Rollout:
    """Per-token rewards (score at the last token - beta * KL), GAE advantages (whitened) and returns of a rollout
    whose log-probs, values and scores are computed."""
    finished = t["finished"].bool()
    penalized = t["scores"] - cfg.missing_eos_penalty * (~finished).float()
    mask = t["mask"]
    rewards, kl = kl_penalty_rewards(t["logps"], t["ref_logps"], penalized, mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False) * mask
    advantages, returns = gae(rewards, t["values"], mask, cfg.gamma, cfg.lam)
    advantages = whiten(advantages, mask) * mask
    return Rollout(input_ids=t["input_ids"], attention_mask=t["attention_mask"], mask=mask,
                   logps=t["logps"], ref_logps=t["ref_logps"], values=t["values"], entropy=t["entropy"],
                   scores=t["scores"], finished=finished, rewards=rewards, kl=kl, advantages=advantages,
                   returns=returns)


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


def gather_rows(accelerator, t: torch.Tensor, pad) -> torch.Tensor:
    """Every process's rows of a rollout tensor, in rank order, on every process (right padded to one width)."""
    if t.dim() == 2:
        t = accelerator.pad_across_processes(t, dim=1, pad_index=pad)
    return accelerator.gather(t)
