"""Evaluation figures: pure functions on scores and log-probs, plus the model-based ones (log-probs of given
responses, perplexity, multiple-choice accuracy).

Conventions. `scores[i][j]` is the score of sample j for prompt i; a prompt may have any number of samples.
Log-probs are summed over the response tokens (the EOS token included when the model emitted one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from prefopt.data.templates import encode
from prefopt.preference.batching import pair_logps
from prefopt.logps import completion_logps


def mean_score(scores: Sequence[Sequence[float]]) -> float:
    """Mean over every sample of every prompt (gold score or RM score)."""
    flat = [float(s) for row in scores for s in row]
    if not flat:
        raise ValueError("no scores")
    return sum(flat) / len(flat)


def prompt_win_rate(policy: Sequence[float], baseline: Sequence[float]) -> float:
    """P(score(y) > score(y')) for y from the policy, y' from the baseline, on one prompt; a tie counts 1/2.

        w = 1/(n m) * sum_{j,k} ( 1[s_j > b_k] + 1/2 * 1[s_j = b_k] )

    Every policy sample is compared with every baseline sample (all n*m pairs), so the figure is antisymmetric:
    w(a, b) = 1 - w(b, a), and a policy compared with itself gets exactly 1/2."""
    if not policy or not baseline:
        raise ValueError("each side needs at least one sample")
    total = 0.0
    for s in policy:
        for b in baseline:
            total += 1.0 if s > b else 0.5 if s == b else 0.0
    return total / (len(policy) * len(baseline))


def win_rate(policy: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]) -> float:
    """Mean over prompts of `prompt_win_rate` (each prompt weighs the same)."""
    if len(policy) != len(baseline):
        raise ValueError(f"policy has {len(policy)} prompts, baseline {len(baseline)}")
    if not policy:
        raise ValueError("no prompts")
    return sum(prompt_win_rate(p, b) for p, b in zip(policy, baseline)) / len(policy)


def sequence_kl(policy_logps: Sequence[float], ref_logps: Sequence[float]) -> float:
    """Monte-Carlo estimate of the sequence-level KL(pi || pi_ref) from samples y_i ~ pi(.|x_i):

        KL ≈ 1/N * sum_i [ log pi(y_i|x_i) - log pi_ref(y_i|x_i) ]

    with log pi(y|x) = sum_t log pi(y_t | x, y_<t). The estimate is unbiased only when the log-probs are those
    of the distribution the samples were drawn from (see `response_logps`'s `temperature`); single terms may be
    negative, the expectation is >= 0. Identical inputs give exactly 0."""
    if len(policy_logps) != len(ref_logps):
        raise ValueError(f"{len(policy_logps)} policy log-probs, {len(ref_logps)} reference log-probs")
    if not policy_logps:
        raise ValueError("no samples")
    return sum(float(p) - float(r) for p, r in zip(policy_logps, ref_logps)) / len(policy_logps)


def mean_length(token_counts: Sequence[int]) -> float:
    """Mean response length in tokens (EOS included when emitted)."""
    if not token_counts:
        raise ValueError("no responses")
    return sum(token_counts) / len(token_counts)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error sd / sqrt(n) (sample sd, n - 1); the error of a single value is 0.

    Evaluation figures are means over prompts of a per-prompt figure (its samples averaged first), so the error
    is over prompts, the unit the test set samples: samples of one prompt are not independent draws of it."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values")
    n = len(vals)
    m = sum(vals) / n
    if n == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in vals) / (n - 1)
    return m, math.sqrt(var / n)


def per_prompt_means(scores: Sequence[Sequence[float]]) -> list[float]:
    """Each prompt's mean over its samples."""
    if any(len(row) == 0 for row in scores):
        raise ValueError("a prompt has no samples")
    return [sum(float(s) for s in row) / len(row) for row in scores]


def per_prompt_win_rates(policy: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]) -> list[float]:
    """`prompt_win_rate` of each prompt (their mean is `win_rate`)."""
    if len(policy) != len(baseline):
        raise ValueError(f"policy has {len(policy)} prompts, baseline {len(baseline)}")
    return [prompt_win_rate(p, b) for p, b in zip(policy, baseline)]


def best_of_n(scores: Sequence[Sequence[float]], n: int) -> list[int]:
    """Per prompt, the index of the highest-scoring of the first n samples (ties: the first)."""
    out = []
    for row in scores:
        if len(row) < n:
            raise ValueError(f"best-of-{n} needs {n} samples per prompt, a prompt has {len(row)}")
        out.append(max(range(n), key=lambda j: (row[j], -j)))
    return out


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020, App. G; Gao et al. 2022, Eq. 1): the
    analytic value for continuous, distinct scores, an upper bound otherwise."""
    if n < 1:
        raise ValueError("n must be >= 1")
    return math.log(n) - (n - 1) / n


# ------------------------------------------------------------------------------------------------ model-based


def _device(model) -> torch.device:
    return next(model.parameters()).device


def response_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   pad_id: int = 0) -> dict[str, torch.Tensor]:
    """(prompt, response) pairs as `prefopt.preference.batching.pair_logps` takes them (its padded layout): each
    prompt + response right-padded to one row, and for each response token the flat index r*T + t of the position
    t whose logits predict it (`source_index`), the token (`target_ids`) and its row (`seq_index`).

    input_ids, attention_mask: (B, T); source_index, target_ids, seq_index: (N,), N response tokens in all. A
    response token at position 0 (an empty prompt) has no position predicting it and is left out."""
    B = len(prompt_ids)
    T = max([len(p) + len(r) for p, r in zip(prompt_ids, response_ids)] + [1])
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    source, target, seq = [], [], []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[i, :n] = 1
        for k, tok in enumerate(r):
            if len(p) + k > 0:
                source.append(i * T + len(p) + k - 1)
                target.append(int(tok))
                seq.append(i)
    long = dict(dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "source_index": torch.tensor(source, **long),
            "target_ids": torch.tensor(target, **long), "seq_index": torch.tensor(seq, **long),
            "num_sequences": torch.tensor(B)}


@torch.no_grad()
def response_logps(model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   pad_id: int = 0, temperature: float = 1.0, batch_size: int = 16,
                   desc: str | None = None, chunk_size: int = 512) -> list[float]:
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) for each (prompt ids, response ids) pair, as floats.

    Sequences are right-padded (positions need no shifting) and taken in the given order in fixed batches, so
    two models scored on the same lists see exactly the same batches. `temperature` divides the logits: pass
    the sampling temperature to get the log-probs of the distribution the responses came from (divided after any
    soft-capping, as the model's forward ends). Through the preference loop's vocabulary projection (`pair_logps`):
    the decoder runs once and only the positions that predict a response token are projected, `chunk_size` at a
    time, so the (B, T, V) float32 logits never exist (at a 256K vocabulary they do not fit beside a 9B model)."""
    from tqdm.auto import tqdm

    if len(prompt_ids) != len(response_ids):
        raise ValueError("prompt_ids and response_ids differ in length")
    was_training = model.training
    model.eval()  # dropout off: log-probs must be deterministic
    device = _device(model)
    # A model that is not a transformers LM (no decoder / lm_head to reach, e.g. a test's stand-in) is run
    # through its own forward, whole logits and all.
    projectable = hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings")
    out: list[float] = []
    starts = range(0, len(prompt_ids), batch_size)
    for s in tqdm(starts, desc=desc or "log-probs", disable=desc is None, leave=False):
        batch = response_batch(prompt_ids[s:s + batch_size], response_ids[s:s + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        if projectable:  # only the positions predicting a response token reach the vocabulary, in chunks
            sums = pair_logps(model, batch, chunk_size, temperature)[0]
        else:
            comp = torch.zeros_like(batch["input_ids"]).flatten()
            comp[batch["source_index"] + 1] = 1
            sums = completion_logps(model, batch["input_ids"], batch["attention_mask"],
                                    comp.view_as(batch["input_ids"]), temperature).sum(-1)
        out += sums.float().cpu().tolist()
    model.train(was_training)
    return out


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    """A whole text (`special`: with one BOS, as every stage tokenizes) or a continuation (no special tokens)."""
    return encode(text, tokenizer) if special else tokenizer(text, add_special_tokens=False)["input_ids"]


def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> float:
    """Corpus perplexity: exp of the mean negative log-likelihood per predicted token over all texts,

        PPL = exp( - sum_i sum_{t>=1} log p(w_{i,t} | w_{i,<t}) / sum_i (T_i - 1) )

    Each text is tokenized as the model sees it (with BOS when the tokenizer adds one); the first token is
    context only. Texts of one token predict nothing and are rejected."""
    ids = [_encode(tokenizer, t, True) for t in texts]
    if any(len(x) < 2 for x in ids):
        raise ValueError("every text needs at least two tokens (one to condition on, one to predict)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logps = response_logps(model, [x[:1] for x in ids], [x[1:] for x in ids], pad, batch_size=batch_size)
    n_tokens = sum(len(x) - 1 for x in ids)
    return math.exp(-sum(logps) / n_tokens)


def option_scores(model, tokenizer, question: str, options: Sequence[str],
                  normalize: Literal["sum", "mean"] = "sum") -> list[float]:
    """Each option's log-likelihood given the question: sum_t log p(o_t | q, o_<t), or that sum divided by the
    option's token count (`mean`, so long options are not penalised for their length).

    The option is tokenized on its own and appended to the question's ids, so every option is scored after the
    same context; put any separating space at the start of the option (" Paris")."""
    q = _encode(tokenizer, question, True)
    opts = [_encode(tokenizer, o, False) for o in options]
    if any(not o for o in opts):
        raise ValueError("an option tokenizes to nothing")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logps = response_logps(model, [q] * len(opts), opts, pad, batch_size=len(opts))
    if normalize == "mean":
        return [lp / len(o) for lp, o in zip(logps, opts)]
    if normalize != "sum":
        raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
    return logps


def multiple_choice_accuracy(model, tokenizer, questions: Sequence[dict],
                             normalize: Literal["sum", "mean"] = "sum") -> dict:
    """Multiple-choice accuracy from option log-likelihoods: the prediction is argmax_k score(option_k | q).

    questions: [{"question": str, "options": [str, ...], "answer": index of the right option}].
    Returns {"accuracy", "predictions"}; a tie goes to the first option."""
    from tqdm.auto import tqdm

    if not questions:
        raise ValueError("no questions")
    preds = []
    for q in tqdm(questions, desc="multiple choice", leave=False, disable=len(questions) < 50):
        scores = option_scores(model, tokenizer, q["question"], q["options"], normalize)
        preds.append(max(range(len(scores)), key=lambda k: scores[k]))
    correct = sum(int(p == int(q["answer"])) for p, q in zip(preds, questions))
    return {"accuracy": correct / len(questions), "predictions": preds}
