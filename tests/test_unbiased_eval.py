"""Evaluation figures a reviewer accepts (issue 21, items 2-4): independent samples for every comparison, the exact
best-of-n KL with ties, length-controlled win rates.

The stage tests run the real `evaluate` stage on policies whose next-token distribution is set by hand
(tests/unigram_lm.py), so every figure has a closed-form value: two responses of K tokens drawn independently from
p are the same with probability (sum_i p_i^2)^K, and a policy's win rate against a baseline by the count of one
letter is an enumeration over the 3^K x 3^K response pairs.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
from prefopt.evaluate import metrics as M

import unigram_lm as U

# ------------------------------------------------------------------------------------------------ best-of-n KL

# Five outcomes, two pairs of tied scores and one outcome of its own: (probability, score)
TIED = [(0.10, 1.0), (0.25, 2.0), (0.15, 2.0), (0.30, 0.0), (0.20, 0.0)]


def _exhaustive_best_of_n(probs, scores, n):
    """pi_n by brute force: every n-tuple of outcomes with its probability, the best by score kept, the first of
    equal best scores on a tie (as `metrics.best_of_n` picks)."""
    pn = [0.0] * len(probs)
    for tup in itertools.product(range(len(probs)), repeat=n):
        weight = math.prod(probs[i] for i in tup)
        best = max(range(n), key=lambda j: (scores[tup[j]], -j))
        pn[tup[best]] += weight
    return pn


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_best_of_n_kl_matches_exhaustive_enumeration(n):
    """The closed form (F(s)^n - F(s-)^n split among tied outcomes in proportion to p) against all 5^n tuples:
    the distribution and its KL agree within 1e-12 (target 1e-6)."""
    probs, scores = [p for p, _ in TIED], [s for _, s in TIED]
    brute = _exhaustive_best_of_n(probs, scores, n)
    assert M.best_of_n_probs(probs, scores, n) == pytest.approx(brute, abs=1e-12)
    kl_brute = sum(a * math.log(a / b) for a, b in zip(brute, probs) if a > 0)
    assert abs(M.best_of_n_kl_exact(probs, scores, n) - kl_brute) < 1e-12
    assert M.best_of_n_kl_exact(probs, scores, n) <= M.best_of_n_kl_bound(n) + 1e-15
    if n >= 2:  # the ties cost KL: strictly below the bound
        assert M.best_of_n_kl_exact(probs, scores, n) < M.best_of_n_kl_bound(n) - 0.05


def test_best_of_n_kl_estimate_from_samples():
    """20 samples of one prompt whose empirical distribution is TIED exactly (counts 2, 5, 3, 6, 4; responses as token
    ids; the two copies of the first response scored 1e-9 apart, as batches can, are still one outcome, where as
    two score levels they would change the KL): the estimate is the exact KL of TIED; a second prompt whose
    samples all tie estimates 0."""
    responses, scores = [], []
    for k, ((p, s), rid) in enumerate(zip(TIED, ([1], [2, 3], [4], [5, 6, 7], [8]))):
        for j in range(round(p * 20)):
            responses.append(list(rid))
            scores.append(s + (1e-9 if j == 0 and k == 0 else 0.0))
    tie = [[9], [10], [9], [11]]
    est = M.best_of_n_kl_estimate([responses, tie], [scores, [0.5] * 4], 4)
    want = M.best_of_n_kl_exact([p for p, _ in TIED], [s for _, s in TIED], 4)
    assert est[0] == pytest.approx(want, abs=1e-6) and est[1] == 0.0
    p, s = M.empirical_outcomes(responses, scores)
    assert sorted(p) == pytest.approx([0.1, 0.15, 0.2, 0.25, 0.3])
    split = M.best_of_n_kl_exact([0.05, 0.05] + [p for p, _ in TIED[1:]], [1.0, 1.0 + 1e-9, 2.0, 2.0, 0.0, 0.0], 4)
    assert abs(split - want) > 5e-4  # far beyond the 1e-6 agreement above


def test_best_of_n_kl_bound_and_its_equality_case():
    """log n - (n-1)/n is reached only where no outcome has positive probability: m equally likely outcomes with
    distinct scores give a KL that rises with m towards the bound (1e-4 at m = 20000) and stays below it; n = 1 is
    0 = the bound; one score level (all tied) gives 0 for any n; the issue's SFT case (best answer 0.7, the rest
    spread thinly) gives 0.32, 0.36, 0.36 at n = 4, 8, 16 against the bound's 0.64, 1.20, 1.84."""
    assert M.best_of_n_kl_exact([0.5, 0.5], [1, 2], 1) == 0.0 == M.best_of_n_kl_bound(1)
    for n in (2, 4, 16):
        bound = math.log(n) - (n - 1) / n
        assert M.best_of_n_kl_bound(n) == pytest.approx(bound, abs=1e-15)
        kls = [M.best_of_n_kl_exact([1 / m] * m, list(range(m)), n) for m in (4, 16, 256, 20000)]
        assert kls == sorted(kls) and kls[-1] < bound and bound - kls[-1] < 1e-4
        assert M.best_of_n_kl_exact([0.2, 0.3, 0.5], [1.0, 1.0, 1.0], n) == 0.0
    k = 20000
    spread = ([0.7] + [0.3 / k] * k, [1.0] + [i / k for i in range(k)])
    assert [round(M.best_of_n_kl_exact(*spread, n), 2) for n in (4, 8, 16)] == [0.32, 0.36, 0.36]
    with pytest.raises(ValueError, match="sum to 1"):
        M.best_of_n_probs([0.5, 0.6], [0, 1], 2)


# ------------------------------------------------------------------------------------------------ length control


def test_lc_win_rate_of_a_policy_that_wins_only_by_length():
    """100 pairs: in 80 the policy's answer is 10 tokens longer and wins 72 (90%), in 20 it is 10 tokens shorter and
    wins 2 (10%): the longer answer wins 90% whichever side gave it. Raw win rate 74/100 = 0.74; the GLM puts it
    all on the length term (phi = logit 0.9 / tanh(10 / sd)), theta = 0: LC win rate 0.5."""
    prefs = [1.0] * 72 + [0.0] * 8 + [1.0] * 2 + [0.0] * 18
    diffs = [10.0] * 80 + [-10.0] * 20
    out = M.length_controlled_win_rate(prefs, diffs)
    assert out["raw"] == pytest.approx(0.74)
    assert out["win_rate"] == pytest.approx(0.5, abs=1e-4)
    sd = math.sqrt(sum((d - 6.0) ** 2 for d in diffs) / 99)  # mean difference 6
    assert out["length_coef"] == pytest.approx(math.log(9) / math.tanh(10 / sd), rel=1e-4)


def test_lc_win_rate_of_a_policy_that_wins_at_equal_length():
    """The same preferences with no length difference: nothing to control for, LC = raw = 0.74, and its error is
    the standard error over prompts of `mean_se` (10 prompts of 10 pairs, the sandwich with factor C/(C-1))."""
    prefs = [1.0] * 72 + [0.0] * 8 + [1.0] * 2 + [0.0] * 18
    clusters = [i // 10 for i in range(100)]
    out = M.length_controlled_win_rate(prefs, [0.0] * 100, clusters)
    assert out["win_rate"] == pytest.approx(0.74, abs=1e-6) and out["length_coef"] == 0.0
    per_prompt = [sum(prefs[10 * c:10 * c + 10]) / 10 for c in range(10)]
    assert out["se"] == pytest.approx(M.mean_se(per_prompt)[1], rel=1e-5)


def test_lc_win_rate_recovers_the_generating_model():
    """Soft preferences equal to sigmoid(theta + phi tanh(d / sd)) with theta = logit 0.7, phi = 1.3: the fit
    returns them (the likelihood's gradient is 0 there), so LC = 0.7 and the length coefficient 1.3."""
    diffs = [-9.0, -4.0, -1.0, 0.0, 2.0, 3.0, 7.0, 12.0]
    m = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1))
    theta, phi = math.log(0.7 / 0.3), 1.3
    prefs = [1 / (1 + math.exp(-(theta + phi * math.tanh(d / sd)))) for d in diffs]
    out = M.length_controlled_win_rate(prefs, diffs)
    assert out["win_rate"] == pytest.approx(0.7, abs=1e-5) and out["length_coef"] == pytest.approx(1.3, abs=1e-4)
    assert out["raw"] != pytest.approx(0.7, abs=1e-3)


def test_rm_pairs_and_identical_rate_hand_computed():
    """Prompt 0: policy scores [2, 1] (lengths 5, 3) against baseline [1] (length 4): pairs (2 vs 1) = 1, d = +1;
    (1 vs 1) = 1/2, d = -1. Identical rate: [x, y] against [x, x] -> 2 of 4 pairs."""
    prefs, diffs, prompts = M.rm_preference_pairs([[2.0, 1.0]], [[1.0]], [[5, 3]], [[4]])
    assert (prefs, diffs, prompts) == ([1.0, 0.5], [1.0, -1.0], [0, 0])
    assert M.prompt_identical_rate([(1, 2), (3,)], [(1, 2), (1, 2)]) == 0.5
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        M.length_controlled_win_rate([1.5], [0.0])


# ------------------------------------------------------------------------------------------------ the stage

P, Q, K, N = (0.6, 0.3, 0.1), (0.4, 0.3, 0.3), 2, 4  # policy p (also the baseline), policy q; K tokens; N samples


def _prompts(path, count):
    rows = [{"instruction": "Sort the numbers in ascending order.", "input": " ".join(str((7 * i + j) % 10)
                                                                                      for j in range(3 + i % 3))}
            for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp, tiny_model_dir, policies, prompts, **evaluate):
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.stage import run_stage

    cfg = from_dict(ExperimentConfig, {
        "name": "u", "output_dir": str(tmp), "wandb": {"mode": "disabled"}, "task": {"name": "none"},
        "stages": ["evaluate"],
        "evaluate": {"policies": policies, "baseline": "sft", "reward_fn": "unigram_lm:count_a", "task": "none",
                     "prompts": {"path": str(prompts)}, "samples_per_prompt": N, "max_new_tokens": K,
                     "backend": "transformers", "batch_size": 8,
                     "judge": {"model": str(tiny_model_dir), "max_prompts": 1000}, **evaluate},
    })
    return run_stage(cfg, "evaluate")


def _win_rate_exact(p, q, k):
    """P(count_a(y) > count_a(y')) + 1/2 P(=) for y ~ p^k, y' ~ q^k independent: count_a ~ Binomial(k, p_a)."""
    bp = [math.comb(k, j) * p[0] ** j * (1 - p[0]) ** (k - j) for j in range(k + 1)]
    bq = [math.comb(k, j) * q[0] ** j * (1 - q[0]) ** (k - j) for j in range(k + 1)]
    return sum(a * b * (1.0 if i > j else 0.5 if i == j else 0.0)
               for i, a in enumerate(bp) for j, b in enumerate(bq))


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unigram")
    p_dir = U.save_unigram_lm(tiny_model_dir, tmp / "p", P)
    q_dir = U.save_unigram_lm(tiny_model_dir, tmp / "q", Q)
    return tmp, p_dir, q_dir, U.letter_distribution(p_dir), U.letter_distribution(q_dir)


@pytest.fixture(scope="module")
def independent(models, tiny_model_dir):
    tmp, p_dir, q_dir, _, _ = models
    prompts = _prompts(tmp / "prompts.jsonl", 48)
    return _run(tmp / "runs", tiny_model_dir, {"a": str(p_dir), "sft": str(p_dir), "q": str(q_dir)}, prompts)


def test_policy_against_itself_independent_samples(models, independent):
    """Policy "a" is the baseline's model under another name. Its samples must be independent draws of the
    baseline's: the identical-pair rate (all 4 x 4 pairs per prompt) is the collision probability
    c = (sum_i p_i^2)^K = 0.46^2 = 0.212 within 3 standard errors, well below the 1/4 + 3/4 c = 0.409 that shared
    random numbers give (every same-slot pair identical); the judge's pairs (sample 0 against sample 0) are
    identical at about c, not always. Win rates by the reward function and by the judge are 0.500 within one
    standard error, and with every response K tokens long the length-controlled win rate is the raw one."""
    _, _, _, p, _ = models
    s = independent
    seeds = s["sampling_seeds"]
    assert set(seeds) == {"a", "sft", "q"} and len(set(seeds.values())) == 3
    a = s["policies"]["a"]
    c = sum(x * x for x in p) ** K
    coupled = 1 / N + (N - 1) / N * c
    assert abs(a["identical_pairs"] - c) < 3 * a["identical_pairs_se"], (a["identical_pairs"], c)
    assert a["identical_pairs"] < (c + coupled) / 2
    assert a["judge_identical_pairs"] < 0.5  # shared random numbers: 1.0
    assert abs(a["win_rate_vs_sft"] - 0.5) <= a["win_rate_vs_sft_se"] and a["win_rate_vs_sft_se"] > 0.01
    assert abs(a["judge_win_rate"] - 0.5) <= a["judge_win_rate_se"]
    assert a["win_rate_vs_sft_lc"] == pytest.approx(a["win_rate_vs_sft"], abs=1e-6)
    assert a["win_rate_vs_sft_lc_se"] == pytest.approx(a["win_rate_vs_sft_se"], rel=1e-4)
    assert a["judge_win_rate_lc"] == pytest.approx(a["judge_win_rate"], abs=1e-6)
    sft = s["policies"]["sft"]
    assert "identical_pairs" not in sft  # the baseline against itself is not a comparison
    assert sft["win_rate_vs_sft"] == 0.5 and sft["win_rate_vs_sft_lc"] == pytest.approx(0.5, abs=1e-9)


def test_win_rate_and_identical_pairs_of_another_policy_are_the_closed_form(models, independent):
    """Policy q against baseline p by the count of "a" (K = 2): the exact independent-sampling win rate
    sum over count pairs = 0.352 and identical-pair rate (sum_i q_i p_i)^K = 0.36^2, each within 3 standard
    errors; the table shows the LC column beside the raw one."""
    _, _, _, p, q = models
    f = independent["policies"]["q"]
    assert abs(f["win_rate_vs_sft"] - _win_rate_exact(q, p, K)) < 3 * f["win_rate_vs_sft_se"]
    assert _win_rate_exact(q, p, K) == pytest.approx(0.352, abs=1e-6)
    c = sum(x * y for x, y in zip(p, q)) ** K
    assert abs(f["identical_pairs"] - c) < 3 * f["identical_pairs_se"]


def test_shared_seeds_would_fail_the_check(models, tiny_model_dir, monkeypatch):
    """The check above can fail: with one seed for every policy (the old behaviour, forced here), "a" and the
    baseline draw the very same samples: every pair the judge reads is one response, and the identical-pair rate
    is at least 1/N."""
    from prefopt.evaluate import recipe

    tmp, p_dir, _, _, _ = models
    monkeypatch.setattr(recipe, "sampling_seed", lambda seed, run_seed, name: seed)
    prompts = _prompts(tmp / "prompts_shared.jsonl", 8)
    s = _run(tmp / "shared", tiny_model_dir, {"a": str(p_dir), "sft": str(p_dir)}, prompts)
    a = s["policies"]["a"]
    assert a["judge_identical_pairs"] == 1.0 and a["identical_pairs"] >= 1 / N



def test_report_and_notebook_tables_show_lc_beside_raw(models, independent):
    """`prefopt report`'s and the notebook's evaluate table (analysis.evaluate_table) on the run above: the
    length-controlled win rate right after the raw one, the judge's win rates after length, with the summary's
    numbers; the report's markdown carries the same columns."""
    from prefopt import analysis as A
    from prefopt.report import write_report

    run = models[0] / "runs" / "u"
    ev = A.evaluate_table(A.load_run(run))
    cols = list(ev.columns)
    assert cols[cols.index("win_rate_vs_sft") + 1] == "win_rate_vs_sft_lc"
    assert cols[cols.index("length") + 1:cols.index("length") + 3] == ["judge_win_rate", "judge_win_rate_lc"]
    assert "kl_to_sft_bound" not in cols  # no best-of-n rows in this run
    q = ev.set_index("policy").loc["q"]
    assert q["win_rate_vs_sft_lc"] == independent["policies"]["q"]["win_rate_vs_sft_lc"]
    text = open(write_report(run)).read()
    assert "| win_rate_vs_sft | win_rate_vs_sft_lc |" in text and "length-controlled" in text


def test_lc_win_rate_is_not_extrapolated():
    """Every policy answer shorter than the baseline's (24-token samples against 300-token reference answers): tanh
    of the standardised difference is near -1 for every pair, the intercept and the length term cannot be told
    apart, and the rate at equal length would be read far outside the data: no figure, and why."""
    prefs = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    out = M.length_controlled_win_rate(prefs, [-300.0, -280.0, -320.0, -250.0, -310.0, -290.0])
    assert out["win_rate"] is None and out["se"] is None and out["length_coef"] is None
    assert out["raw"] == pytest.approx(1 / 3) and "every answer is shorter" in out["why"]
    assert "-320 to -250 tokens" in out["why"]
    # one pair at equal length brings the rate at 0 inside the data
    assert M.length_controlled_win_rate(prefs + [1.0], [-300.0, -280.0, -320.0, -250.0, -310.0, -290.0, 0.0])[
        "win_rate"] is not None
