"""Evaluation figures: pure functions on scores and log-probs, plus the model-based ones (log-probs of given
responses, perplexity, multiple-choice accuracy).

Conventions. `scores[i][j]` is the score of sample j for prompt i; a prompt may have any number of samples.
Log-probs are summed over the response tokens (the EOS token included when the model emitted one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from prefopt.data.templates import encode
from prefopt.training.logps import response_logps


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


def best_of_n_kl_bound(n: int) -> float:
    """The analytical formula log n - (n - 1) / n (Stiennon et al. 2020, App. G; Gao et al. 2022, Eq. 1): an UPPER
    BOUND on KL(best-of-n || base) (Beirami et al. 2024, arXiv 2401.01879, Sec. 3), reached only in the limit where
    no single outcome has positive probability (continuous, distinct scores). Reported beside the estimate
    (`best_of_n_kl_estimate`), never as the value."""
    if n < 1:
        raise ValueError("n must be >= 1")
    return math.log(n) - (n - 1) / n


def best_of_n_probs(probs: Sequence[float], scores: Sequence[float], n: int) -> list[float]:
    """pi_n(i): the probability that best-of-n picks outcome i, for a discrete base distribution p over outcomes with
    scores s (Beirami et al. 2024, Sec. 2, with ties).

    Derivation. Draw y_1..y_n iid from p and keep the draw of highest score, the FIRST such draw on a tie (the rule
    of `best_of_n`). With F(s) = P(score <= s) and F(s-) = P(score < s), the kept score is s exactly when all n
    draws score <= s and not all score < s:  P(max = s) = F(s)^n - F(s-)^n. Given which draws score s, each of them
    is, independently, outcome i with probability p_i / q(s) among the outcomes of score s (q(s) = P(score = s)),
    so the first of them is too. Hence

        pi_n(i) = p_i / q(s_i) * ( F(s_i)^n - F(s_i-)^n ).

    With all scores distinct q(s_i) = p_i and this is the formula of Beirami et al.; tied outcomes share their
    level's mass in proportion to p. Outcomes with p_i = 0 get 0."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if len(probs) != len(scores) or not probs:
        raise ValueError(f"{len(probs)} probabilities, {len(scores)} scores: need as many, at least one")
    p = [float(x) for x in probs]
    if any(x < 0 for x in p) or abs(sum(p) - 1.0) > 1e-9:
        raise ValueError(f"probabilities must be >= 0 and sum to 1, got sum {sum(p)}")
    level: dict[float, float] = {}  # score -> q(score)
    for x, s in zip(p, scores):
        level[float(s)] = level.get(float(s), 0.0) + x
    mass, below = {}, 0.0  # score -> F(s)^n - F(s-)^n, levels in increasing score
    for s in sorted(level):
        at_or_below = below + level[s]
        mass[s] = min(at_or_below, 1.0) ** n - below ** n
        below = at_or_below
    return [x / level[float(s)] * mass[float(s)] if x > 0 else 0.0 for x, s in zip(p, scores)]


def best_of_n_kl_exact(probs: Sequence[float], scores: Sequence[float], n: int) -> float:
    """KL(pi_n || p) = sum_i pi_n(i) log( pi_n(i) / p_i ) with pi_n from `best_of_n_probs`.

    Since pi_n(i) / p_i = (F(s_i)^n - F(s_i-)^n) / q(s_i) is the same for every outcome of a score level, the KL is
    that of the best-of-n score distribution against the base one: it depends on the scores' levels only. For n = 1
    it is 0; one level (every score tied) gives 0 for every n; it never exceeds `best_of_n_kl_bound(n)`."""
    pn = best_of_n_probs(probs, scores, n)
    return sum(a * math.log(a / float(b)) for a, b in zip(pn, probs) if a > 0)


def empirical_outcomes(responses: Sequence, scores: Sequence[float]) -> tuple[list[float], list[float]]:
    """(probabilities, scores) of the distinct responses among a prompt's samples: p = count / number of samples,
    each response's score the mean of its samples' scores (a response scored twice may differ in the last bits
    with its batch: it is still one outcome)."""
    if len(responses) != len(scores) or not responses:
        raise ValueError(f"{len(responses)} responses, {len(scores)} scores: need as many, at least one")
    groups: dict = {}
    for r, s in zip(responses, scores):
        groups.setdefault(tuple(r) if isinstance(r, list) else r, []).append(float(s))
    m = len(responses)
    return [len(v) / m for v in groups.values()], [sum(v) / len(v) for v in groups.values()]


def best_of_n_kl_estimate(responses: Sequence[Sequence], scores: Sequence[Sequence[float]], n: int) -> list[float]:
    """Per prompt, the exact best-of-n KL (`best_of_n_kl_exact`) under the empirical distribution of that prompt's
    base samples (`empirical_outcomes`): a plug-in estimate of KL(best-of-n || base) that counts ties. Average it
    over prompts (`mean_se`) for the figure.

    The estimate uses only outcomes seen among the m samples of a prompt, so it is at most log m; with all m
    samples distinct it is the exact KL of a uniform m-atom distribution, which falls short of the continuous
    value log n - (n-1)/n by little (m = n = 16: 1.794 against 1.835; m = n = 4: 0.590 against 0.636). When a
    few answers carry most of the probability (a tuned policy on a checkable task) it is far below the bound:
    best answer at 0.7, the rest spread thinly: 0.32, 0.36, 0.36 at n = 4, 8, 16 against 0.64, 1.20, 1.84."""
    if len(responses) != len(scores):
        raise ValueError(f"{len(responses)} prompts of responses, {len(scores)} of scores")
    out = []
    for resp, sc in zip(responses, scores):
        p, s = empirical_outcomes(resp, sc)
        out.append(best_of_n_kl_exact(p, s, n))
    return out


def prompt_identical_rate(policy: Sequence, baseline: Sequence) -> float:
    """The fraction of (policy sample, baseline sample) pairs of one prompt, all n * m of them, whose responses are
    identical: such a pair always ties. Independent draws give sum_y pi(y) pi_base(y) in expectation (sum_y
    pi(y)^2 for a policy against itself); samples that share random numbers give more."""
    if not policy or not baseline:
        raise ValueError("each side needs at least one sample")
    same = sum(1 for a in policy for b in baseline if a == b)
    return same / (len(policy) * len(baseline))


def length_controlled_win_rate(preferences: Sequence[float], length_diffs: Sequence[float],
                               clusters: Sequence | None = None, ridge: float = 1e-6) -> dict:
    """The length-controlled win rate of AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval", arXiv
    2404.04475, Sec. 3), in its simplest form: the logistic regression

        logit P(policy preferred in pair i) = theta + phi * tanh( d_i / sd(d) ),    d_i = len(policy) - len(baseline)

    fitted by maximum likelihood to the preferences y_i in [0, 1] (soft labels: a tie is 1/2, a judge's p counts as
    it is), and the win rate predicted with the length difference set to 0:  LC = sigmoid(theta).

    Deviations from AlpacaEval's GLM (`length_controlled_v1`): no instruction-difficulty term (AlpacaEval's is
    fitted once on many models' annotations of its 805 instructions; here there is one policy against one
    baseline per fit, so the per-prompt term would not be identified), no regularisation towards gamed baselines and
    no cross-validated L1 penalty (a ridge of `ridge` on (theta, phi) only keeps the fit finite when one side wins
    every pair); lengths are in tokens, not characters (the difference is standardised, so only its shape matters).

    The rate at d = 0 is read inside the data only: when every pair's difference has one sign (every answer longer,
    or every one shorter, than the baseline's, e.g. 24-token samples against GPT-4's 300-token reference answers,
    where tanh saturates at -1 and theta and phi cannot be told apart) there is no LC figure: win_rate, se and
    length_coef are None and "why" says so.

    Returns {"win_rate": LC, "se": its standard error, "length_coef": phi, "raw": mean(y)}. The error is the delta
    method on a sandwich covariance of theta clustered by `clusters` (the prompt of each pair: pairs of one prompt
    are not independent), with the small-sample factor C / (C - 1); with no length difference it equals `mean_se`
    of the per-prompt mean preferences when every prompt has the same number of pairs. One cluster: error 0."""
    import numpy as np

    y = np.asarray(preferences, dtype=np.float64)
    d = np.asarray(length_diffs, dtype=np.float64)
    if y.ndim != 1 or len(y) == 0 or d.shape != y.shape:
        raise ValueError(f"{len(y)} preferences and {len(d)} length differences: need as many, at least one")
    if ((y < 0) | (y > 1)).any():
        raise ValueError("preferences must lie in [0, 1]")
    groups = list(range(len(y))) if clusters is None else list(clusters)
    if len(groups) != len(y):
        raise ValueError(f"{len(groups)} cluster labels for {len(y)} preferences")
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    if sd > 0 and (d.min() > 0 or d.max() < 0):
        side = "longer" if d.min() > 0 else "shorter"
        return {"win_rate": None, "se": None, "length_coef": None, "raw": float(y.mean()),
                "why": f"every answer is {side} than the one it is compared with ({d.min():+.0f} to "
                       f"{d.max():+.0f} tokens): the win rate at equal length would be an extrapolation"}
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(x), x], 1)  # (N, 2): intercept, length term

    def objective(b):  # penalised negative log-likelihood with soft labels
        z = X @ b
        return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * ridge * b @ b)

    beta = np.zeros(2)
    for _ in range(200):  # damped Newton: the objective is convex
        p = 1 / (1 + np.exp(-(X @ beta)))
        grad = X.T @ (p - y) + ridge * beta
        H = X.T @ (X * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(H, grad)
        t, f0 = 1.0, objective(beta)
        while objective(beta - t * step) > f0 - 1e-4 * t * (grad @ step) and t > 1e-8:
            t /= 2
        beta = beta - t * step
        if np.max(np.abs(t * step)) < 1e-12:
            break
    p = 1 / (1 + np.exp(-(X @ beta)))
    lc = float(1 / (1 + np.exp(-beta[0])))
    index: dict = {}
    for g in groups:
        index.setdefault(g, len(index))
    C = len(index)
    se = 0.0
    if C > 1:
        H = X.T @ (X * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        per = np.zeros((C, 2))
        np.add.at(per, [index[g] for g in groups], X * (y - p)[:, None])  # score of each cluster
        Hinv = np.linalg.pinv(H)
        cov = Hinv @ (per.T @ per) @ Hinv * C / (C - 1)
        se = float(lc * (1 - lc) * math.sqrt(max(cov[0, 0], 0.0)))
    return {"win_rate": lc, "se": se, "length_coef": float(beta[1]), "raw": float(y.mean())}


def rm_preference_pairs(policy: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                        policy_lengths: Sequence[Sequence[int]], baseline_lengths: Sequence[Sequence[int]]) -> tuple:
    """Every (policy sample, baseline sample) pair of each prompt, as `prompt_win_rate` counts them, flattened for
    `length_controlled_win_rate`: (preferences 1 / 1/2 / 0, length differences policy - baseline, prompt index)."""
    if not (len(policy) == len(baseline) == len(policy_lengths) == len(baseline_lengths)):
        raise ValueError("scores and lengths must cover the same prompts")
    prefs, diffs, prompts = [], [], []
    for i, (ps, bs, pl, bl) in enumerate(zip(policy, baseline, policy_lengths, baseline_lengths)):
        for s, a in zip(ps, pl):
            for b, c in zip(bs, bl):
                prefs.append(1.0 if s > b else 0.5 if s == b else 0.0)
                diffs.append(float(a - c))
                prompts.append(i)
    return prefs, diffs, prompts


# ------------------------------------------------------------------------------------------------ model-based


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
