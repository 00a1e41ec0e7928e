"""A likelihood reward model: the reward is a language model's own length-normalised log-likelihood of the response,

    r_phi(x, y) = beta / |y| * log pi_phi(y | x) = beta / |y| * sum_t log pi_phi(y_t | x, y_<t)

(SimPO's implicit reward, Meng et al. 2024, Eq. 4; |y| counts the response tokens and EOS), trained from the SFT
model with the Bradley-Terry loss on preference pairs (`likelihood_objective`, reward/loss.py) in
the shared preference loop. `reward.kind: likelihood` selects it.

Why it exists: a classification head on the last token of a small model learns only what that one position can
see. On the built-in reverse and lookup tasks the classifier stayed near 0.62 held-out accuracy while the SFT
model's own likelihood already ordered the same pairs as gold 0.88 / 0.73 of the time: the language-model head
reads the answer token by token, where a mistake is a low-probability token. Length normalisation keeps the
reward from preferring short answers, which a summed log-likelihood would.

A saved likelihood reward model is a causal-LM folder plus `reward_model.json` ({"kind": "likelihood", "beta"});
`scoring.scorer.load_scorer` reads that file, so the `score`, `ppo` and `evaluate` stages use it as any reward model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prefopt.models.loading import REWARD_META
from prefopt.scoring.batches import by_length

META = REWARD_META  # reward_model.json


def likelihood_reward(sum_logps: torch.Tensor, lengths: torch.Tensor, beta: float) -> torch.Tensor:
    """r = beta * sum_logps / |y|: (B,) summed response log-probs and response lengths (tokens incl. EOS) -> (B,).
    A response of length 0 (cut away by max_length) gets reward 0."""
    return beta * sum_logps / lengths.clamp(min=1).to(sum_logps.dtype)


def write_meta(folder: Path, beta: float) -> None:
    (Path(folder) / META).write_text(json.dumps(
        {"kind": "likelihood", "beta": beta,
         "reward": "beta * mean log p(response tokens + EOS | prompt) (prefopt.scoring.likelihood)"}, indent=2) + "\n")


def read_meta(folder: str | Path) -> dict | None:
    """A reward model's `reward_model.json`, or None when it has none (a hub reward model). prefopt writes one for
    each reward model it saves: a likelihood one (`write_meta`) or a sequence classifier
    (`models.write_classifier_meta`)."""
    path = Path(folder) / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(meta, dict) and meta.get("kind") == "classifier":
        return meta
    if not (isinstance(meta, dict) and meta.get("kind") == "likelihood" and isinstance(meta.get("beta"), (int, float))):
        raise ValueError(f"{path}: expected {{\"kind\": \"likelihood\", \"beta\": <number>}} or "
                         f"{{\"kind\": \"classifier\"}}, got {meta}")
    return meta


class LikelihoodScorer:
    """Scores (prompt, response) with `likelihood_reward`, tokenized exactly as the preference loop tokenizes
    pairs (prefopt.preference.data.tokenized_pairs), so the reward read here is the one trained."""

    kind = "likelihood"

    def __init__(self, model, tokenizer, beta: float):
        self.model, self.tokenizer, self.beta = model, tokenizer, float(beta)

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 64, max_length: int = 512,
              progress=None) -> list[float]:
        from prefopt.training.logps import response_logps
        from prefopt.preference.data import tokenized_pairs

        prompt_ids, response_ids = [], []
        rows = [{"prompt": p, "chosen": r, "rejected": r} for p, r in zip(prompts, responses)]
        for t in tokenized_pairs(rows, self.tokenizer, max_length):
            prompt_ids.append(t["prompt_ids"][:max_length])
            response_ids.append(t["chosen_ids"][:max(0, max_length - len(prompt_ids[-1]))])  # cut as the loop cuts
        def score_batch(idx: list[int]) -> list[float]:  # one batch per call: the bar moves as batches finish
            sums = response_logps(self.model, [prompt_ids[i] for i in idx], [response_ids[i] for i in idx],
                                  self.tokenizer.pad_token_id, batch_size=len(idx))
            lengths = torch.tensor([len(response_ids[i]) for i in idx])
            return likelihood_reward(torch.tensor(sums), lengths, self.beta).tolist()

        return by_length([len(p) + len(r) for p, r in zip(prompt_ids, response_ids)], batch_size, score_batch,
                         progress)
