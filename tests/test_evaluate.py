"""Evaluation figures on hand-made numbers, model-based figures against direct computation, and the stage."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from prefopt.evaluate import metrics as M

from prefopt.training import logps as L
# ------------------------------------------------------------------------------------------------ pure figures


def test_mean_score_over_all_samples():
    """(1 + 0 + 0.5) / 3 = 0.5: every sample weighs the same."""
    assert M.mean_score([[1.0, 0.0], [0.5]]) == pytest.approx(0.5)


def test_prompt_win_rate_all_pairs_ties_half():
    """Policy [2, 1] vs baseline [1]: 2 > 1 wins (1), 1 = 1 ties (1/2) -> (1 + 0.5) / 2 = 0.75."""
    assert M.prompt_win_rate([2.0, 1.0], [1.0]) == pytest.approx(0.75)
    assert M.prompt_win_rate([0.0], [1.0, 2.0]) == 0.0
    # [1, 3] vs [2, 0]: pairs (1,2)=0 (1,0)=1 (3,2)=1 (3,0)=1 -> 3/4

    assert M.prompt_win_rate([1.0, 3.0], [2.0, 0.0]) == pytest.approx(0.75)


def test_win_rate_mean_over_prompts_and_antisymmetric():
    """Prompt 1: 0.75 (above); prompt 2: [0] vs [0] tie = 0.5 -> (0.75 + 0.5) / 2 = 0.625."""
    a, b = [[2.0, 1.0], [0.0]], [[1.0], [0.0]]
    assert M.win_rate(a, b) == pytest.approx(0.625)
    assert M.win_rate(b, a) == pytest.approx(1 - 0.625)
    assert M.win_rate(a, a) == 0.5  # a policy against itself, ties counting half
    with pytest.raises(ValueError):
        M.win_rate(a, b[:1])


def test_sequence_kl_and_length():
    """KL ≈ mean(logp - ref_logp) = ((-1+2) + (-2+2) + (-3+5)) / 3 = (1 + 0 + 2) / 3 = 1."""
    assert M.sequence_kl([-1.0, -2.0, -3.0], [-2.0, -2.0, -5.0]) == pytest.approx(1.0)
    assert M.sequence_kl([-1.5, -7.25], [-1.5, -7.25]) == 0.0
    assert M.mean_length([3, 4, 8]) == pytest.approx(5.0)


# ------------------------------------------------------------------------------------------------ a unigram stub LM
# Tokens a b c d have p = 1/2, 1/4, 1/8, 1/8 whatever came before; id 4 is BOS (never predicted).
UNIGRAM = torch.tensor([0.5, 0.25, 0.125, 0.125]).log().tolist() + [-1e4]


class UnigramLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        return SimpleNamespace(logits=torch.tensor(UNIGRAM).expand(B, T, -1).clone())


class CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([4] if add_special_tokens else []) + ["abcd".index(ch) for ch in text]}


def test_perplexity_hand_computed():
    """Texts "ab", "cd" predict a, b, c, d: log-probs -(1 + 2 + 3 + 3) ln 2 over 4 tokens -> PPL = 2^(9/4)."""
    assert M.perplexity(UnigramLM(), CharTokenizer(), ["ab", "cd"]) == pytest.approx(2 ** (9 / 4))


def test_multiple_choice_sum_vs_mean_forced():
    """Options "c" and "aaaa": sums log(1/8) = -3 ln2 vs 4 log(1/2) = -4 ln2 -> sum picks "c" (0);
    per-token means -3 ln2 vs -ln2 -> mean picks "aaaa" (1)."""
    model, tok = UnigramLM(), CharTokenizer()
    q = [{"question": "ab", "options": ["c", "aaaa"], "answer": 0}]
    ln2 = math.log(2)
    assert M.option_scores(model, tok, "ab", ["c", "aaaa"]) == pytest.approx([-3 * ln2, -4 * ln2])
    assert M.option_scores(model, tok, "ab", ["c", "aaaa"], "mean") == pytest.approx([-3 * ln2, -ln2])
    assert M.multiple_choice_accuracy(model, tok, q)["accuracy"] == 1.0
    out = M.multiple_choice_accuracy(model, tok, q, normalize="mean")
    assert out["accuracy"] == 0.0 and out["predictions"] == [1]


# ------------------------------------------------------------------------------------------------ a real tiny LM


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from prefopt.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir), dtype="float32").eval(), load_tokenizer(str(tiny_model_dir))


def _direct_logp(model, prompt, response, temperature=1.0):
    """log p(response | prompt) one sequence at a time, no padding, written out."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0] / temperature  # (T, V)
    logp = torch.log_softmax(logits.float(), -1)
    return sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(response))


def test_response_logps_match_direct_computation(tiny):
    """Batched, right-padded sequences of different lengths give each sequence's own log-prob (at T=1 and T=0.7)."""
    model, tok = tiny
    prompts = [tok("Sort 3 1 2")["input_ids"], tok("hello")["input_ids"], tok("The quick brown fox")["input_ids"]]
    responses = [tok("1 2 3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                 tok(" there, how can I help you today?", add_special_tokens=False)["input_ids"],
                 tok(" jumps", add_special_tokens=False)["input_ids"]]
    for T in (1.0, 0.7):
        got = L.response_logps(model, prompts, responses, pad_id=tok.pad_token_id, temperature=T, batch_size=2)
        want = [_direct_logp(model, p, r, T) for p, r in zip(prompts, responses)]
        assert got == pytest.approx(want, abs=1e-4)


def test_perplexity_and_choice_match_direct_computation(tiny):
    model, tok = tiny
    texts = ["The quick brown fox jumps", "hello there"]
    ids = [tok(t)["input_ids"] for t in texts]
    total = sum(_direct_logp(model, x[:1], x[1:]) for x in ids)
    want = math.exp(-total / sum(len(x) - 1 for x in ids))
    assert M.perplexity(model, tok, texts) == pytest.approx(want, rel=1e-4)

    q = tok("Sort 3 1 2 ->")["input_ids"]
    options = [" 1 2 3", " 3 2 1", " the lazy dog jumps"]
    direct = [_direct_logp(model, q, tok(o, add_special_tokens=False)["input_ids"]) for o in options]
    best = max(range(3), key=lambda k: direct[k])
    questions = [{"question": "Sort 3 1 2 ->", "options": options, "answer": best},
                 {"question": "Sort 3 1 2 ->", "options": options, "answer": (best + 1) % 3}]
    out = M.multiple_choice_accuracy(model, tok, questions)
    assert out["predictions"] == [best, best] and out["accuracy"] == 0.5


# ------------------------------------------------------------------------------------------------ the stage

PROMPTS = [
    {"instruction": "Sort the numbers in ascending order.", "input": "3 1 2"},
    {"instruction": "Put the numbers in increasing order.", "input": "4 2 5"},
    {"instruction": "Sort the numbers in ascending order.", "input": "2 0"},
]


@pytest.fixture(scope="module")
def stage_run(tiny_model_dir, tmp_path_factory):
    """One evaluate run of two policies that are the same tiny model ("a" and the baseline "sft"), scored by the
    sort task's gold and a (random) tiny reward model, with the tiny model itself as judge; a `stage:dpo` policy
    whose stage is off must be dropped."""
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.models.loading import load_tokenizer, save_model
    from prefopt.stage import run_stage
    from prefopt.dist.process import seed_everything
    from transformers import AutoModelForSequenceClassification

    tmp = tmp_path_factory.mktemp("eval")
    seed_everything(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    save_model(rm, load_tokenizer(str(tiny_model_dir)), tmp / "rm")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    cfg = from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp), "wandb": {"mode": "disabled"}, "task": {"name": "none"},
        "stages": ["evaluate"],
        "evaluate": {"policies": {"a": str(tiny_model_dir), "sft": str(tiny_model_dir), "dpo": "stage:dpo"},
                     "reward_model": str(tmp / "rm"), "task": "sort", "prompts": {"path": str(prompts)},
                     "samples_per_prompt": 2,
                     "max_new_tokens": 6, "backend": "transformers", "judge": {"model": str(tiny_model_dir)}},
    })
    summary = run_stage(cfg, "evaluate")
    return cfg.root / "evaluate", summary


def test_stage_writes_alpaca_eval_files(stage_run):
    d, _ = stage_run
    assert not (d / "dpo.json").exists()  # its stage is not in the experiment
    for name in ("a", "sft"):
        rows = json.loads((d / f"{name}.json").read_text())
        assert len(rows) == len(PROMPTS)
        for row, src in zip(rows, PROMPTS):
            assert row["instruction"] == src["instruction"]
            assert row["generator"] == name
            assert isinstance(row["output"], str)
            if src["input"]:
                assert row["input"] == src["input"]
                assert list(row) == ["instruction", "input", "output", "generator"]
            else:
                assert "input" not in row
                assert list(row) == ["instruction", "output", "generator"]
    # the same model under two names, sampled under two seeds (recorded): not the same answers
    seeds = json.loads((d / "summary.json").read_text())["sampling_seeds"]
    assert seeds["a"] != seeds["sft"]
    assert [r["output"] for r in json.loads((d / "a.json").read_text())] != \
        [r["output"] for r in json.loads((d / "sft.json").read_text())]


def test_stage_summary_policy_against_itself(stage_run):
    """The same model under two names, sampled independently: KL exactly 0 (each sample scored by the same weights
    in the same batches); the win rates are recomputed here from the per-sample file of each side (every sample
    against every baseline sample of the prompt, ties 1/2) and the identical-pair rate counted the same way; the
    baseline's own rows are 1/2; the table and the figure. (Closed-form values of these figures: test_unbiased_eval.)"""
    d, summary = stage_run
    on_disk = json.loads((d / "summary.json").read_text())
    assert on_disk["policies"] == summary["policies"] and set(on_disk["policies"]) == {"a", "sft"}
    rows = {n: [json.loads(x) for x in (d / f"samples_{n}.jsonl").read_text().splitlines()] for n in ("a", "sft")}
    by_prompt = {n: [[r for r in rows[n] if r["prompt_id"] == pid] for pid in dict.fromkeys(r["prompt_id"]
                                                                                           for r in rows["sft"])]
                 for n in rows}
    a, sft = on_disk["policies"]["a"], on_disk["policies"]["sft"]
    for key, field in (("win_rate_vs_sft", "rm"), ("win_rate_vs_sft_gold", "gold")):
        per = [M.prompt_win_rate([r[field] for r in x], [r[field] for r in y])
               for x, y in zip(by_prompt["a"], by_prompt["sft"])]
        assert (a[key], a[key + "_se"]) == pytest.approx(M.mean_se(per)) and sft[key] == 0.5
    same = [sum(r["response"] == b["response"] for r in x for b in y) / (len(x) * len(y))
            for x, y in zip(by_prompt["a"], by_prompt["sft"])]
    assert a["identical_pairs"] == pytest.approx(sum(same) / len(same))
    assert a["gold_gain"] == pytest.approx(a["gold_score"] - sft["gold_score"])
    for p in (a, sft):
        assert p["kl_to_sft"] == 0.0 and p["kl_to_sft_se"] == 0.0
        assert 0.0 <= p["gold_score"] <= 1.0 and math.isfinite(p["rm_score"]) and 1 <= p["length"] <= 6
    assert 0.0 < a["judge_win_rate"] < 1.0 and a["judge_win_rate_se"] >= 0
    assert 0.0 <= a["judge_order_disagreement"] <= 1.0 and 0.0 < a["judge_win_rate_lc"] < 1.0
    assert "judge_win_rate" not in sft
    assert len(rows["a"]) == 2 * len(PROMPTS)
    assert all(s["logp"] == s["ref_logp"] and s["logp"] < 0 for s in rows["a"])
    table = (d / "table.md").read_text()
    assert table.startswith("Figures on 3 test prompts") and "| a |" in table and "| sft |" in table
    assert "LC win vs SFT (RM)" in table and "LC judge win" in table
    assert "0.500 ± 0.000" not in table and on_disk["split"] == "test"  # an SE of 0 is not printed as ± 0
    assert (d / "evaluate.png").stat().st_size > 0


def test_kl_to_sft_against_two_known_categorical_distributions(tiny_model_dir, tmp_path):
    """Policy and baseline sample 4 tokens, each iid from a 3-letter distribution set by hand (tests/unigram_lm.py):
    q = (0.4, 0.3, 0.3) and p = (0.6, 0.3, 0.1), at temperature 0.7. Every sample's logp / ref_logp is the sum of
    log q_T / log p_T of its letters (q_T proportional to q^(1/0.7)), and the stage's KL is within 3 standard errors
    of the analytic 4 * KL(q_T || p_T) = 1.22, which T = 1 log-probs of the same samples (0.56) or the T = 1 KL
    (0.67) would miss by more than 5 standard errors."""
    import unigram_lm as U
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.stage import run_stage

    T, K = 0.7, 4
    p_dir = U.save_unigram_lm(tiny_model_dir, tmp_path / "p", (0.6, 0.3, 0.1))
    q_dir = U.save_unigram_lm(tiny_model_dir, tmp_path / "q", (0.4, 0.3, 0.3))
    pT, qT = U.letter_distribution(p_dir, T), U.letter_distribution(q_dir, T)
    p1, q1 = U.letter_distribution(p_dir), U.letter_distribution(q_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Say something {i}."}) + "\n" for i in range(48)))
    cfg = from_dict(ExperimentConfig, {
        "name": "kl", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "task": {"name": "none"},
        "stages": ["evaluate"],
        "evaluate": {"policies": {"sft": str(p_dir), "q": str(q_dir)}, "reward_model": "", "task": "none",
                     "prompts": {"path": str(prompts)}, "samples_per_prompt": 8, "max_new_tokens": K,
                     "temperature": T, "backend": "transformers", "batch_size": 16},
    })
    f = run_stage(cfg, "evaluate")["policies"]["q"]
    rows = [json.loads(x) for x in (tmp_path / "kl" / "evaluate" / "samples_q.jsonl").read_text().splitlines()]
    for r in rows:
        letters = [U.LETTERS.index(ch) for ch in r["response"]]
        assert len(letters) == K
        assert r["logp"] == pytest.approx(sum(math.log(qT[i]) for i in letters), abs=1e-4)
        assert r["ref_logp"] == pytest.approx(sum(math.log(pT[i]) for i in letters), abs=1e-4)

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    analytic = K * kl(qT, pT)
    assert analytic == pytest.approx(1.2167, abs=1e-4)
    assert abs(f["kl_to_sft"] - analytic) < 3 * f["kl_to_sft_se"], (f["kl_to_sft"], f["kl_to_sft_se"])
    wrong_T = K * sum(x * math.log(a / b) for x, a, b in zip(qT, q1, p1))  # T = 1 log-probs of T = 0.7 samples
    for wrong in (wrong_T, K * kl(q1, p1)):
        assert abs(f["kl_to_sft"] - wrong) > 5 * f["kl_to_sft_se"]


def test_cli_evaluate_as_a_user_runs_it(tiny_model_dir, tmp_path):
    """`python -m prefopt evaluate cfg.yaml --key=value` in a subprocess writes the files and prints the table."""
    import os
    import subprocess
    import sys

    import yaml

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS[:2]))
    cfg = {"name": "cli", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "task": {"name": "none"},
           "stages": ["evaluate"],
           "evaluate": {"policies": {"sft": str(tiny_model_dir)}, "reward_model": "",
                        "prompts": {"path": str(prompts)}, "max_new_tokens": 4}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "prefopt", "evaluate", str(tmp_path / "cfg.yaml"),
                          "--evaluate.samples_per_prompt=1"], check=False, capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| policy |" in res.stdout and "| sft |" in res.stdout
    d = tmp_path / "cli" / "evaluate"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["samples_per_prompt"] == 1 and summary["policies"]["sft"]["kl_to_sft"] == 0.0
    assert len(json.loads((d / "sft.json").read_text())) == 2


def test_checkpoint_curves_and_best_of_n(tiny_model_dir, tmp_path):
    """`evaluate.checkpoints` scores every checkpoint an aligner saved (trainer `checkpoint-N`, PPO `iter-N`
    snapshots) on the first `checkpoint_prompts`; the curve starts at the baseline (KL 0) and ends at the final
    model; best-of-n rows are recomputed from the samples they picked from (`samples_best_of_n.jsonl`): the
    reward-model best of the first n per prompt (first on a tie), its gold, and the KL estimated from each prompt's
    samples by brute force over n-tuples, with the bound log n - (n-1)/n beside it. The figure's data is what the
    summary says."""
    import shutil

    from prefopt.analysis import curve_rows
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.models.loading import load_tokenizer, save_model
    from prefopt.stage import run_stage
    from transformers import AutoModelForSequenceClassification

    import torch
    from transformers import AutoModelForCausalLM

    stage = tmp_path / "dpo"
    tok = load_tokenizer(str(tiny_model_dir))
    for i, sub in enumerate(("checkpoints/checkpoint-3", "snapshots/iter-7")):
        torch.manual_seed(i)
        m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        with torch.no_grad():
            m.lm_head.weight.add_(0.5 * torch.randn_like(m.lm_head.weight))  # a policy that moved from SFT
        save_model(m, tok, stage / sub)
    shutil.copytree(tiny_model_dir, stage / "model")
    shutil.copytree(tiny_model_dir, stage / "checkpoints" / "checkpoint-8")  # the final model: its "final" point
    (stage / "checkpoints" / "checkpoint-9").mkdir()  # no config.json: a checkpoint being written, skipped
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    save_model(rm, load_tokenizer(str(tiny_model_dir)), tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    cfg = from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "task": {"name": "none"},
        "stages": ["evaluate"],
        "evaluate": {"policies": {"sft": str(tiny_model_dir), "dpo": str(stage / "model")}, "task": "sort",
                     "reward_model": str(tmp_path / "rm"), "prompts": {"path": str(prompts)}, "samples_per_prompt": 2,
                     "max_new_tokens": 5, "backend": "transformers", "checkpoints": True, "checkpoint_prompts": 2,
                     "best_of_n": [1, 2, 4]},
    })
    summary = run_stage(cfg, "evaluate")
    curve = summary["curves"]["dpo"]
    assert [p["step"] for p in curve] == [0, 3, 7, "final"]
    assert curve[0]["kl"] == 0.0 and curve[-1]["kl"] == 0.0  # the final model is the SFT model here
    assert curve[1]["kl"] > 0 and curve[2]["kl"] > 0  # the perturbed checkpoints moved away from it
    assert summary["sampling_seeds"]["dpo"] != summary["sampling_seeds"]["sft"]  # the final point: its own draw
    bon = summary["best_of_n"]
    assert [b["n"] for b in bon] == [1, 2, 4]
    assert [b["kl_bound"] for b in bon] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    d = tmp_path / "t" / "evaluate"
    rows = [json.loads(x) for x in (d / "samples_best_of_n.jsonl").read_text().splitlines()]
    prompts = [[r for r in rows if r["prompt_id"] == pid] for pid in dict.fromkeys(r["prompt_id"] for r in rows)]
    assert len(prompts) == len(PROMPTS) and all([r["sample"] for r in x] == [0, 1, 2, 3] for x in prompts)
    for b in bon:
        n = b["n"]
        best = [max(x[:n], key=lambda r: (r["rm"], -r["sample"])) for x in prompts]
        assert (b["rm"], b["gold"]) == pytest.approx((sum(r["rm"] for r in best) / len(best),
                                                      sum(r["gold"] for r in best) / len(best)))
        kls = []
        for x in prompts:  # pi_n by enumerating the 4^n tuples of this prompt's samples, each with weight 1/4^n
            pn: dict = {}
            for tup in itertools.product(x, repeat=n):
                top = max(range(n), key=lambda j: (tup[j]["rm"], -j))
                pn[tup[top]["response"]] = pn.get(tup[top]["response"], 0.0) + 0.25 ** n
            freq = {r["response"]: sum(y["response"] == r["response"] for y in x) / 4 for r in x}
            kls.append(sum(v * math.log(v / freq[k]) for k, v in pn.items()))
        assert (b["kl"], b["kl_se"]) == pytest.approx(M.mean_se(kls), abs=1e-9)
        assert b["kl"] <= b["kl_bound"] + 1e-12
        assert summary["policies"][f"best_of_{n}"]["kl_to_sft"] == b["kl"]
        assert summary["policies"][f"best_of_{n}"]["kl_to_sft_bound"] == b["kl_bound"]
    on_disk = json.loads((d / "curves.json").read_text())
    rows = curve_rows({"curves": on_disk["curves"], "best_of_n": on_disk["best_of_n"]})
    assert [r["step"] for r in rows if r["method"] == "dpo"] == [0, 3, 7, "final"]
    assert (d / "overoptimisation.png").stat().st_size > 0


def test_a_policy_with_another_tokenizer_gets_no_kl(tiny_model_dir, tmp_path):
    """The baseline scores each policy's token ids; for a policy whose tokenizer has another vocabulary those ids are
    other text to the baseline (the KL came out at 227 nats between two tiny families): no KL for it, a warning
    naming why, and the policy that shares the baseline's tokenizer keeps its KL of 0 against itself."""
    from prefopt.config import from_dict
    from prefopt.dist.process import seed_everything
    from prefopt.experiment import ExperimentConfig
    from prefopt.models.loading import build_tiny_llama, build_tokenizer, save_model
    from prefopt.stage import run_stage

    seed_everything(1)
    tok = build_tokenizer(["Sort the numbers 9 8 7 then say the quick brown fox jumps"] * 30, vocab_size=280)
    save_model(build_tiny_llama(tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, intermediate_size=64), tok, tmp_path / "other")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    cfg = from_dict(ExperimentConfig, {
        "name": "v", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "task": {"name": "none"},
        "stages": ["evaluate"],
        "evaluate": {"policies": {"sft": str(tiny_model_dir), "same": str(tiny_model_dir),
                                  "other": str(tmp_path / "other")},
                     "reward_model": "", "task": "sort", "prompts": {"path": str(prompts)}, "max_new_tokens": 4,
                     "backend": "transformers"}})
    summary = run_stage(cfg, "evaluate")
    figs = summary["policies"]
    assert figs["same"]["kl_to_sft"] == 0.0 and "kl_to_sft" not in figs["other"]
    assert figs["other"]["gold_score"] is not None and figs["other"]["logp"] < 0  # its own log-probs are there
    assert any(w.startswith("other: no kl_to_sft (its tokenizer's vocabulary is not sft's") for w in summary["warnings"])
