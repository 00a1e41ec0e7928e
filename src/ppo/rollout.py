"""PPO's data side: the value model, the prompt sampler, batching prompt + response tokens, and collecting one scored
rollout (gathered over processes).

Layout of a rollout batch: each row is `prompt tokens + response tokens`, right padded to T. Per-token tensors
are (B, T-1): position t holds what belongs to the action input_ids[t+1] (its log-prob, the value of the state
before it, its reward), and `mask` is 1 where input_ids[t+1] is a response token. Right padding keeps position
ids natural, so prefopt.training.logps' conventions hold unchanged.

The policy, reference and value passes read those rows as a prefix tree (`tree_batch`, when the model's attention
is SDPA or eager: prefopt.models.varlen): the rows in one row, each prompt token the rollout's prompts share (a
template, a system prompt) computed once, and the vocabulary projected at the actions only; what they return is
laid back into the (B, T-1) tensors, the same numbers as the padded forward's to float rounding.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from prefopt.data.templates import encode_many
from prefopt.generation.base import Completion, Sampling, derive_seed
from prefopt.models import varlen
from prefopt.models.loading import unwrapped
from prefopt.training.logps import token_logps
from prefopt.training.padding import right_pad
from prefopt.training.prefix_tree import lay_down
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state  # (B, T, H)
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


def tree_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Right-padded rows and their action mask (B, T-1) as one prefix-tree row (prefopt.training.prefix_tree):
    input_ids, position_ids (1, N); `keep` the row positions that predict an action (sorted, each once), and for
    each action, `pick` (its row in `keep`), `target_ids` and `flat` (its index b * (T-1) + t in a (B, T-1)
    tensor); num_tokens N (what the throughput meter counts)."""
    B, T = input_ids.shape
    rows, lengths, actions = input_ids.tolist(), attention_mask.sum(1).tolist(), mask.nonzero().tolist()
    targets: list[list[tuple[int, int, int]]] = [[] for _ in range(B)]
    for b, t in actions:
        targets[b].append((t, rows[b][t + 1], b * (T - 1) + t))
    row = lay_down([(rows[b][:lengths[b]], targets[b]) for b in range(B)])
    source, tokens, flat = zip(*row["targets"]) if row["targets"] else ((), (), ())
    keep = sorted(set(source))
    where = {p: i for i, p in enumerate(keep)}
    device, long = input_ids.device, dict(dtype=torch.long, device=input_ids.device)
    return {"input_ids": torch.tensor([row["ids"]], **long), "position_ids": torch.tensor([row["pos"]], **long),
            "keep": torch.tensor(keep, **long), "pick": torch.tensor([where[p] for p in source], **long),
            "target_ids": torch.tensor(tokens, **long), "flat": torch.tensor(flat, **long),
            "num_tokens": torch.tensor(len(row["ids"]), device=device)}


def _laid_back(values: torch.Tensor, tree: dict, shape: torch.Size) -> torch.Tensor:
    """Per-action values (A,) into a zero (B, T-1) tensor at each action's place."""
    out = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    return out.index_put((tree["flat"],), values).view(shape)


def policy_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                   temperature: float, tree: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies (B, T-1) of the response tokens, at the sampling temperature.

    The logits are divided by the temperature the responses were sampled at, so log pi is the log-prob of the
    distribution that produced them (Huang et al. 2024); zero outside `mask`. With `tree` (`tree_batch` of the same
    rows) a model that reads it runs once over the prefix tree and projects the action positions only."""
    with varlen.switched(model) if tree is not None else nullcontext(False) as reads:
        if reads:
            logits = model(input_ids=tree["input_ids"], position_ids=tree["position_ids"], use_cache=False,
                           logits_to_keep=tree["keep"]).logits[0].float() / temperature  # (K, V): each once
            log_p = torch.log_softmax(logits, dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1)[tree["pick"]]
            logps = log_p[tree["pick"]].gather(-1, tree["target_ids"].unsqueeze(-1)).squeeze(-1)
            return _laid_back(logps, tree, mask.shape), _laid_back(entropy, tree, mask.shape)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, V)
    logits = logits / temperature
    logps = token_logps(logits, input_ids[:, 1:]) * mask
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1) * mask
    return logps, entropy


def value_forward(value, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                  tree: dict | None = None) -> torch.Tensor:
    """V(s_t) of the state before each action (B, T-1), zero outside `mask`; over the prefix tree with `tree`
    when the value model's attention reads it."""
    hf = getattr(unwrapped(value), "model", None)  # a (prepared) ValueModel's transformers model
    with varlen.switched(hf) if tree is not None and hf is not None else nullcontext(False) as reads:
        if reads:
            v = value(tree["input_ids"], position_ids=tree["position_ids"])[0]  # (N,)
            return _laid_back(v[tree["keep"]][tree["pick"]], tree, mask.shape)
    return value(input_ids, attention_mask)[:, :-1] * mask


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
    computed: dict = field(default_factory=dict)
    """This process's share, for the throughput meter: `tokens` (its rows' real tokens, what sampling produced and
    read) and `sampled` (those rows, padded), `positions` and `useful` (what each of the policy, reference and value
    passes computed: padded rows and their real tokens, or the prefix tree's positions, all real) and `batches`
    (what those passes read: each chunk's tree or padded rows)."""

    def batch(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor) and getattr(self, f.name).dim() == 2}


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

    `cfg` is the PPOConfig (missing_eos_penalty, whiten_rewards, gamma, lam, forward_batch_size). With `gather`
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

    # Forward passes in chunks of forward_batch_size rows: the rollout can be larger than fits at once. Each chunk
    # is read as a prefix tree where the policy's attention can (its prompts' shared tokens computed once)
    chunks = {k: [] for k in ("logps", "ref_logps", "entropy", "values")}
    passes = {"positions": 0, "useful": 0, "batches": []}  # what each of the three passes computed (the meter's)
    for start in range(0, len(prompts), cfg.forward_batch_size):
        idx = torch.arange(start, min(start + cfg.forward_batch_size, len(prompts)), device=device)
        ids, am, m = batch["input_ids"][idx], batch["attention_mask"][idx], batch["mask"][idx]
        tree = tree_batch(ids, am, m) if varlen.reads_pieces(policy) else None
        logps, entropy = policy_forward(policy, ids, am, m, sampling.temperature, tree)
        ref_logps, _ = policy_forward(ref, ids, am, m, sampling.temperature, tree)
        chunks["logps"].append(logps)
        chunks["entropy"].append(entropy)
        chunks["ref_logps"].append(ref_logps)
        chunks["values"].append(value_forward(value, ids, am, m, tree))
        n = int(tree["num_tokens"]) if tree is not None else None
        passes["positions"] += n if n is not None else ids.numel()
        passes["useful"] += n if n is not None else int(am.sum())
        passes["batches"].append(tree if tree is not None else {"input_ids": ids, "attention_mask": am})
    t = {k: torch.cat(v) for k, v in chunks.items()}
    t.update(batch, scores=scores, finished=finished)
    local_tokens = int(batch["attention_mask"].sum())
    if gather is not None:
        t = {k: gather(v, tokenizer.pad_token_id if k == "input_ids" else 0) for k, v in t.items()}
    ro = score_rollout(t, kl_coef, cfg)
    ro.computed = {"tokens": local_tokens, **passes,
                   "sampled": {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}}
    return ro


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
