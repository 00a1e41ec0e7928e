"""The order-swapped pairwise judge: combining the two orders, a position-biased stub, a real tiny judge LM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from prefopt.evaluate.judge import LMJudge, combine_orders, judge_pairs


def test_combine_orders_hand_computed():
    """Pair 1: forward P(A)=0.8, swapped P(A)=0.3 -> x wins swapped with 0.7; p = (0.8 + 0.7)/2 = 0.75; both
    orders pick x: agree. Pair 2: forward 0.6, swapped P(A)=0.7 -> 0.3; p = (0.6 + 0.3)/2 = 0.45; forward picks
    x, swapped picks y: disagree. win_rate = (0.75 + 0.45)/2 = 0.6, disagreement = 1/2."""
    out = combine_orders([0.8, 0.6], [0.3, 0.7])
    assert out["p_first_better"] == pytest.approx([0.75, 0.45])
    assert out["win_rate"] == pytest.approx(0.6)
    assert out["disagreement"] == pytest.approx(0.5)


def test_always_a_judge_is_cancelled_by_the_swap():
    """A judge that answers A whatever it reads (P(A) = 0.9) wins x every pair in one order alone; with the swap
    every pair gets (0.9 + 0.1)/2 = 0.5 and the two orders always disagree."""
    calls = []

    def always_a(triples):
        calls.append(list(triples))
        return [0.9] * len(triples)

    out = judge_pairs(always_a, ["q1", "q2", "q3"], ["good", "good", "bad"], ["bad", "bad", "good"])
    assert out["p_first_better"] == pytest.approx([0.5, 0.5, 0.5])
    assert out["win_rate"] == pytest.approx(0.5)
    assert out["disagreement"] == 1.0
    assert calls[0][0] == ("q1", "good", "bad") and calls[1][0] == ("q1", "bad", "good")  # second call swapped


def test_swap_recovers_a_biased_judges_underlying_preference():
    """A judge that prefers the better response with 0.8 but adds +0.15 to P(A): forward 0.95, swapped P(A|A=y)
    = 0.2 + 0.15 = 0.35 -> 0.65 for x; averaged (0.95 + 0.65)/2 = 0.8, the unbiased preference."""

    def biased(triples):
        return [(0.8 if a == "good" else 0.2) + 0.15 for _, a, _ in triples]

    out = judge_pairs(biased, ["q", "q"], ["good", "bad"], ["bad", "good"])
    assert out["p_first_better"] == pytest.approx([0.8, 0.2])
    assert out["disagreement"] == 0.0


def test_lm_judge_end_to_end(tiny_model_dir):
    """A real (random) tiny LM as judge: probabilities in (0, 1), batching does not change them, figures in range."""
    from prefopt.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    judge = LMJudge(load_causal_lm(str(tiny_model_dir), dtype="float32"), tok, batch_size=3)
    a, b = judge.ids
    assert a != b
    triples = [("Sort 3 1 2", "1 2 3", "3 2 1"), ("Say hi", "hi", "hello there, how can I help you today?"),
               ("Sort 2 1", "1 2", "2 1 and more words")]
    p = judge.prob_a(triples)
    assert len(p) == 3 and all(0.0 < x < 1.0 for x in p)
    single = [judge.prob_a([t])[0] for t in triples]  # right padding must not move the answer position
    assert single == pytest.approx(p, abs=1e-5)
    # P(A) is the softmax over the two letters' logits after the rendered prompt, from the model's own forward
    from prefopt.data.templates import encode

    for t, got in zip(triples, p):
        with torch.no_grad():
            logits = judge.model(input_ids=torch.tensor([encode(judge.render(*t), tok)])).logits[0, -1].double()
        assert got == pytest.approx(float(torch.softmax(logits[[a, b]], -1)[0]), abs=1e-6)
    assert judge.render(*triples[0]).rstrip().endswith(("Answer:", "Answer: "))
    out = judge_pairs(judge.prob_a, [t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples])
    assert 0.0 < out["win_rate"] < 1.0 and 0.0 <= out["disagreement"] <= 1.0
    assert len(out["p_first_better"]) == 3
    # the chat form renders through the tokenizer's chat template
    chat = LMJudge(judge.model, tok, chat=True)
    assert chat.render(*triples[0]).startswith("<|im_start|>user")
    assert all(0.0 < x < 1.0 for x in chat.prob_a(triples[:1]))


def test_judge_figures_length_controlled_and_identical_pairs():
    """The stage's judge figures (sample 0 of each side per prompt) from a judge that prefers the longer answer with
    0.9 whatever it says. 10 prompts: on 7 the policy's answer is 2 tokens longer (p = 0.9), on 2 it is 2 shorter
    (p = 0.1), on 1 both gave the same answer (p = 1/2). Raw win rate (7 * 0.9 + 0.5 + 2 * 0.1) / 10 = 0.70, its
    error mean_se's over the 10 prompts; the GLM fits the three groups exactly with theta = 0 (the longer answer
    wins 0.9 from either side), so the length-controlled win rate is 0.5; identical pairs 1/10."""
    from prefopt.evaluate import metrics as M
    from prefopt.evaluate.figures import judge_figures

    def sample_set(*answers):
        return {"completions": [[SimpleNamespace(token_ids=list(ids), text="")] for ids in answers]}

    policy = sample_set(*[(1, 2, 3, 4)] * 7, (3, 3), (1,), (5,))
    base = sample_set(*[(7, 8)] * 7, (3, 3), (1, 2, 3), (5, 6, 7))
    p = [0.9] * 7 + [0.5] + [0.1] * 2
    f = judge_figures({"p_first_better": p, "disagreement": 0.25}, policy, base, 10)
    assert f["judge_win_rate"] == pytest.approx(0.70) and f["judge_win_rate_se"] == pytest.approx(M.mean_se(p)[1])
    assert f["judge_win_rate_lc"] == pytest.approx(0.5, abs=1e-6) and f["judge_length_coef"] > 1
    assert f["judge_identical_pairs"] == pytest.approx(0.1) and f["judge_order_disagreement"] == 0.25
