"""The evaluation suite: letter and full multiple choice on a model whose log-probs are chosen by hand, the same on
the tiny Llama against direct computation and against lm-evaluation-harness, the C-Eval / MMLU / JSONL loaders on
good and broken files, perplexity files, and the `evaluate` stage with the suite on."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prefopt.data.errors import DataError
from prefopt.evaluate import suite as S
from prefopt.evaluate.config import SuiteConfig

LM_EVAL_TASK = Path(__file__).parent / "data" / "lm_eval_task"
LN2 = math.log(2)

# ------------------------------------------------------------------------------------------------ a unigram stub LM
# Characters are tokens (id = code point, BOS = 128). Whatever came before, the next token is " " with p = 1/2,
# "B" 1/4, "A" 1/8, "C" 1/16, "D" 1/16 (the five sum to 1), anything else ~0.
PROBS = {" ": 1 / 2, "B": 1 / 4, "A": 1 / 8, "C": 1 / 16, "D": 1 / 16}
LOGITS = torch.full((129,), -1e4)
for ch, p in PROBS.items():
    LOGITS[ord(ch)] = math.log(p)


class UnigramLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        return SimpleNamespace(logits=LOGITS.expand(B, T, -1).clone())


class CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([128] if add_special_tokens else []) + [ord(ch) for ch in text]}


def _rows(options, answers):
    return [{"question": f"q{i}?", "options": list(options), "answer": "ABCD".index(a), "row": i + 1}
            for i, a in enumerate(answers)]


def test_letter_method_hand_computed():
    """" A" = log 1/2 + log 1/8 = -4 ln2, " B" = -1 - 2 = -3 ln2, " C" = " D" = -5 ln2: the prediction is B
    whatever the options say. Answers [B, A]: accuracy 1/2, stderr sqrt(1/2 * 1/2 / 2) = 0.35355."""
    from prefopt.evaluate import metrics as M

    rows = _rows(["x", "y", "z", "w"], "BA")
    q = S.mc_questions(rows, "letter")
    assert q[0]["question"] == "q0?\nA. x\nB. y\nC. z\nD. w\nAnswer:"
    assert M.option_scores(UnigramLM(), CharTokenizer(), q[0]["question"], q[0]["options"]) == pytest.approx(
        [-4 * LN2, -3 * LN2, -5 * LN2, -5 * LN2])
    figs = S.model_figures(UnigramLM(), CharTokenizer(), SuiteConfig(mc_method="letter"), None, {"hand": rows})
    assert figs == pytest.approx({"mc/hand/accuracy": 0.5, "mc/hand/accuracy_stderr": math.sqrt(0.25 / 2)})


def test_full_method_sum_and_mean_hand_computed():
    """Continuations " BBBB", " C", " CD", " DDDD" (the space is a token too):
    sums  -1-2*4 = -9, -1-4 = -5, -1-4-4 = -9, -1-4*4 = -17 (x ln2): the sum picks B;
    means -9/5 = -1.8, -5/2 = -2.5, -9/3 = -3, -17/5 = -3.4 (x ln2): the per-token mean picks A."""
    rows = _rows(["BBBB", "C", "CD", "DDDD"], "BBA")
    q = S.mc_questions(rows, "full")
    assert q[0]["question"] == "q0?\nAnswer:" and q[0]["options"] == [" BBBB", " C", " CD", " DDDD"]
    tok, model = CharTokenizer(), UnigramLM()
    by_sum = S.model_figures(model, tok, SuiteConfig(mc_method="full"), None, {"f": rows})
    by_mean = S.model_figures(model, tok, SuiteConfig(mc_method="full", mc_normalize="mean"), None, {"f": rows})
    assert by_sum["mc/f/accuracy"] == pytest.approx(2 / 3)  # B, B right; A wrong
    assert by_mean["mc/f/accuracy"] == pytest.approx(1 / 3)
    assert by_mean["mc/f/accuracy_stderr"] == pytest.approx(math.sqrt(1 / 3 * 2 / 3 / 3))


def test_perplexity_hand_computed(tmp_path):
    """Lines "AB" and "B C" (blank lines skipped): predicted A B | B " " C -> log-probs -(3+2) and -(2+1+4) ln2
    over 5 tokens -> PPL = 2^(12/5)."""
    f = tmp_path / "heldout.txt"
    f.write_text("AB\n\nB C\n")
    texts = S.load_texts(f)
    assert texts == ["AB", "B C"]
    figs = S.model_figures(UnigramLM(), CharTokenizer(), SuiteConfig(), texts, {})
    assert figs == {"ppl": pytest.approx(2 ** (12 / 5))}


def test_accuracy_with_stderr():
    """3 of 4 right: p = 0.75, sqrt(0.75 * 0.25 / 4) = 0.21651."""
    assert S.accuracy_with_stderr([True, True, False, True]) == pytest.approx((0.75, math.sqrt(0.75 * 0.25 / 4)))
    assert S.accuracy_with_stderr([True]) == (1.0, 0.0)


def test_lm_eval_figures_names():
    results = {"mmlu": {"acc,none": 0.48, "acc_stderr,none": 0.004, "alias": "mmlu", "sample_len": 14042},
               "mmlu_anatomy": {"acc,none": 0.5}, "gsm8k": {"exact_match,strict-match": 0.1, "name": "gsm8k",
                                                        "exact_match_stderr,strict-match": "N/A"}}
    assert S.lm_eval_figures(results, ["mmlu", "gsm8k"]) == {
        "lm_eval/mmlu/acc": 0.48, "lm_eval/mmlu/acc_stderr": 0.004, "lm_eval/gsm8k/exact_match@strict-match": 0.1}


# ------------------------------------------------------------------------------------------------ loaders

CEVAL = """id,question,A,B,C,D,answer,explanation
0,"1+1=?",1,2,3,4,B,"one, then one more"
1,"Which is a colour,
in English?",red,dog,sun,"two, three",A,
"""
MMLU = '2+2=?,3,4,5,6,B\n"Capital of France, please",Paris,Rome,Oslo,Bern,A\n'


def test_load_ceval_mmlu_jsonl(tmp_path):
    """C-Eval's header (extra id and explanation columns ignored, a quoted newline inside a field), MMLU's headerless
    six columns (a quoted comma), and JSONL: the same rows out, rows numbered by the line they start on."""
    (tmp_path / "ceval_val.csv").write_text(CEVAL)
    (tmp_path / "mmlu_test.csv").write_text(MMLU)
    (tmp_path / "mc.jsonl").write_text(json.dumps({"question": "n?", "A": 1, "B": 2, "C": 3, "D": 4,
                                                   "answer": "D"}) + "\n")
    ceval = S.load_multiple_choice(tmp_path / "ceval_val.csv")
    assert ceval == [
        {"question": "1+1=?", "options": ["1", "2", "3", "4"], "answer": 1, "row": 2},
        {"question": "Which is a colour,\nin English?", "options": ["red", "dog", "sun", "two, three"], "answer": 0,
         "row": 3}]
    mmlu = S.load_multiple_choice(tmp_path / "mmlu_test.csv")
    assert [r["answer"] for r in mmlu] == [1, 0] and mmlu[1]["question"] == "Capital of France, please"
    assert [r["row"] for r in mmlu] == [1, 2]
    assert S.load_multiple_choice(tmp_path / "mc.jsonl") == [
        {"question": "n?", "options": ["1", "2", "3", "4"], "answer": 3, "row": 1}]
    assert len(S.load_multiple_choice(LM_EVAL_TASK / "tiny_mc.jsonl")) == 4


@pytest.mark.parametrize("name,text,row,field,words", [
    ("ceval_val.csv", "id,question,A,B,C,D,answer\n0,q,1,2,,4,A\n", 2, "C", "empty option"),
    ("ceval_val.csv", "id,question,A,B,C,D,answer\n0,q,1,2,3,4,A\n1,q,1,2,3,4,E\n", 3, "answer", "got 'E'"),
    ("ceval_test.csv", "id,question,A,B,C,D,answer\n0,q,1,2,3,4,\n", 2, "answer", "test split hides"),
    ("ceval_test.csv", "id,question,A,B,C,D\n0,q,1,2,3,4\n", 1, "answer", "header has no column answer"),
    ("ceval_val.csv", "id,question,A,B,C,D,answer\n0,q,1,2\n", 2, "C", "missing"),
    ("mmlu_test.csv", "q,1,2,3,4,A\nq,1,2,3,4\n", 2, "answer", "5 columns"),
    ("mmlu_test.csv", "q,1,2,3,4,A\n,1,2,3,4,A\n", 2, "question", "missing"),
    ("mc.jsonl", '{"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "A"}\n'
                 '{"question": "q", "A": "1", "B": "2", "C": "3", "answer": "A"}\n', 2, "D", "missing"),
    ("mc.jsonl", '{"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": 0}\n', 1, "answer", "got '0'"),
])
def test_broken_multiple_choice_files_name_file_row_field(tmp_path, name, text, row, field, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as e:
        S.load_multiple_choice(path)
    assert (e.value.path, e.value.row, e.value.field) == (str(path), row, field)
    assert str(e.value).startswith(f"{path}, row {row}, field '{field}': ") and words in str(e.value)


def test_perplexity_file_forms_and_errors(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text('{"text": "one"}\n{"text": "two", "id": 2}\n')
    assert S.load_texts(good) == ["one", "two"]
    other = tmp_path / "c.jsonl"
    other.write_text('{"content": "x"}\n')
    assert S.load_texts(other, "content") == ["x"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl, row 2, field 'text'"):
        S.load_texts(bad)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no texts"):
        S.load_texts(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="file not found"):
        S.load_texts(tmp_path / "absent.txt")


def test_check_warns_on_missing_suite_files(tmp_path, capsys, monkeypatch):
    """`prefopt check` names suite files that are not here and a missing lm-eval, as warnings (the GPU machine
    may have both); it still passes."""
    import importlib.util as iu

    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.pipeline import check

    (tmp_path / "here.csv").write_text(MMLU)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    cfg = from_dict(ExperimentConfig, {"name": "x", "stages": ["evaluate"], "evaluate": {
                    "policies": {"a": "m"}, "prompts": {"path": str(tmp_path / "p.jsonl")},
                    "suite": {"perplexity_file": str(tmp_path / "gone.txt"), "lm_eval_tasks": ["hellaswag"],
                              "multiple_choice": [str(tmp_path / "here.csv"), str(tmp_path / "absent.jsonl")]}}})
    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert check(cfg) == 0
    out = capsys.readouterr().out
    assert "evaluate.suite.perplexity_file: file" in out and "gone.txt" in out
    assert "evaluate.suite.multiple_choice[1]: file" in out and "here.csv" not in out
    assert "lm-evaluation-harness is not installed here" in out


def test_nothing_configured_runs_nothing(tmp_path):
    assert S.run_suite({"sft": "/nowhere"}, SuiteConfig(), tmp_path, None) == {}
    assert list(tmp_path.iterdir()) == []
    assert S.merge_suite({"sft": {"gold_score": 1.0}}, {}) == {"sft": {"gold_score": 1.0}}
    with pytest.raises(ValueError, match="appear twice"):
        SuiteConfig(multiple_choice=["a/x.csv", "b/x.jsonl"])
    with pytest.raises(ValueError, match="shots must be >= 0"):
        SuiteConfig(lm_eval_num_fewshot={"mmlu": -1})


# ------------------------------------------------------------------------------------------------ the tiny Llama


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from prefopt.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir), dtype="float32").eval(), load_tokenizer(str(tiny_model_dir))


def _direct_logp(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one unpadded forward pass, written out."""
    logp = torch.log_softmax(model(input_ids=torch.tensor([context + continuation])).logits[0].float(), -1)
    return sum(logp[len(context) - 1 + t, tok].item() for t, tok in enumerate(continuation))


def test_letter_and_full_match_direct_computation(tiny):
    """On a real model the suite's predictions are the argmax of the directly computed letter / option
    log-likelihoods after the prompts it builds; the answer key is set from those, 2 right and 2 wrong."""
    model, tok = tiny
    rows = S.load_multiple_choice(LM_EVAL_TASK / "tiny_mc.jsonl")
    for method in ("letter", "full"):
        preds = []
        for r in rows:
            ctx = tok(S.letter_prompt(r["question"], r["options"]) if method == "letter"
                      else S.full_prompt(r["question"]))["input_ids"]
            conts = [f" {k}" for k in "ABCD"] if method == "letter" else [f" {o}" for o in r["options"]]
            scores = [_direct_logp(model, ctx, tok(c, add_special_tokens=False)["input_ids"]) for c in conts]
            preds.append(max(range(4), key=lambda k: scores[k]))
        keyed = [{**r, "answer": p if i < 2 else (p + 1) % 4} for i, (r, p) in enumerate(zip(rows, preds))]
        figs = S.model_figures(model, tok, SuiteConfig(mc_method=method), None, {"t": keyed})
        assert figs["mc/t/accuracy"] == 0.5, method


def test_lm_eval_local_task_agrees_with_full_method(tiny_model_dir, tiny, tmp_path):
    """lm-eval's `acc` on a local YAML task (data_files relative to the task folder) equals the suite's `full`
    method on the same rows: the answer key is set from the suite's predictions (2 right, 2 wrong), so both must
    say 0.5, and lm-eval's stderr is the sample one, sqrt(var/n) with var = 4 * 1/4 / 3 = 1/3 -> 0.28868."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra `prefopt[eval]`")
    model, tok = tiny
    task = tmp_path / "task"
    shutil.copytree(LM_EVAL_TASK, task)
    rows = S.load_multiple_choice(task / "tiny_mc.jsonl")
    from prefopt.evaluate import metrics as M

    preds = M.multiple_choice_accuracy(model, tok, S.mc_questions(rows, "full"))["predictions"]
    lines = [json.loads(x) for x in (task / "tiny_mc.jsonl").read_text().splitlines()]
    for i, (line, p) in enumerate(zip(lines, preds)):
        line["answer"] = "ABCD"[p if i < 2 else (p + 1) % 4]
    (task / "tiny_mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    out = tmp_path / "out"
    out.mkdir()
    cfg = SuiteConfig(multiple_choice=[str(task / "tiny_mc.jsonl")], mc_method="full", lm_eval_tasks=[str(task)],
                      lm_eval_batch_size=4)
    figs = S.run_suite({"tiny": str(tiny_model_dir)}, cfg, out, SimpleNamespace(log=lambda m: None))["tiny"]
    assert figs["mc/tiny_mc/accuracy"] == 0.5 and figs["lm_eval/prefopt_tiny_mc/acc"] == 0.5
    assert figs["lm_eval/prefopt_tiny_mc/acc_stderr"] == pytest.approx(math.sqrt(1 / 3 / 4))
    assert 0.0 <= figs["lm_eval/prefopt_tiny_mc/acc_norm"] <= 1.0
    raw = json.loads((out / "lm_eval_tiny.json").read_text())
    assert raw["prefopt_tiny_mc"]["results"]["prefopt_tiny_mc"]["acc,none"] == 0.5
    assert "| tiny |" in (out / "suite.md").read_text()


def test_full_method_log_likelihoods_are_lm_evals(tiny_model_dir, tiny):
    """Per option, not only per argmax: lm-eval's log-likelihood of each choice (its per-sample records) equals
    `option_scores` after the suite's `full_prompt`, so the `full` method is lm-eval-harness's `acc`."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra `prefopt[eval]`")
    import contextlib

    from lm_eval.tasks import TaskManager
    from prefopt.evaluate import metrics as M

    model, tok = tiny
    with contextlib.chdir(LM_EVAL_TASK):
        res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tiny_model_dir), "dtype": "float32"},
                                      tasks=["prefopt_tiny_mc"], device="cpu", batch_size=4, log_samples=True,
                                      task_manager=TaskManager(include_path=str(LM_EVAL_TASK), include_defaults=False))
    rows = S.load_multiple_choice(LM_EVAL_TASK / "tiny_mc.jsonl")
    samples = sorted(res["samples"]["prefopt_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows)
    for r, s in zip(rows, samples):
        theirs = [ll for ll, _ in s["filtered_resps"]]
        ours = M.option_scores(model, tok, S.full_prompt(r["question"]), [f" {o}" for o in r["options"]])
        assert ours == pytest.approx(theirs, abs=1e-3)


# ------------------------------------------------------------------------------------------------ the stage


def test_evaluate_stage_with_suite_from_the_cli(tiny_model_dir, tiny, tmp_path):
    """`python -m prefopt evaluate cfg.yaml --evaluate.suite.*=...` as a user runs it, with perplexity and letter
    multiple choice (lm-eval goes through the same `run_suite`, tested above): the figures land in summary.json
    beside the stage's own, in suite.md and under the main table in table.md (printed once), in the report's
    evaluate table and in metrics.jsonl, equal to the suite's
    functions on the same model in this process."""
    import os
    import subprocess
    import sys

    import yaml
    from prefopt.evaluate import metrics as M

    heldout = tmp_path / "heldout.txt"
    heldout.write_text("The quick brown fox jumps over the lazy dog.\nhello there\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "Sort the numbers.", "input": "3 1 2"}) + "\n")
    cfg = {"name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "task": {"name": "none"},
           "stages": ["evaluate"],
           "evaluate": {"policies": {"sft": str(tiny_model_dir)}, "reward_model": "", "prompts": {"path": str(prompts)},
                        "samples_per_prompt": 1, "max_new_tokens": 4, "backend": "transformers"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "prefopt", "evaluate", str(tmp_path / "cfg.yaml"),
                          f"--evaluate.suite.perplexity_file={heldout}",
                          f"--evaluate.suite.multiple_choice={LM_EVAL_TASK / 'tiny_mc.jsonl'}"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    d = tmp_path / "t" / "evaluate"
    sft = json.loads((d / "summary.json").read_text())["policies"]["sft"]
    model, tok = tiny
    assert sft["ppl"] == pytest.approx(M.perplexity(model, tok, S.load_texts(heldout)), rel=1e-5)
    rows = S.load_multiple_choice(LM_EVAL_TASK / "tiny_mc.jsonl")
    want = S.model_figures(model, tok, SuiteConfig(), None, {"tiny_mc": rows})
    assert {k: sft[k] for k in want} == pytest.approx(want)
    assert sft["kl_to_sft"] == 0.0  # the stage's own figures are still there
    assert not any(k.startswith("lm_eval/") for k in sft) and not (d / "lm_eval_sft.json").exists()
    table = (d / "suite.md").read_text()
    assert "| sft |" in table and "| ppl | mc/tiny_mc/accuracy |" in table and table in res.stdout
    assert table.strip() in (d / "table.md").read_text() and res.stdout.count("| ppl |") == 1  # in the table, once
    from prefopt import analysis as A

    ev = A.evaluate_table(A.load_run(tmp_path / "t"))  # what `prefopt report` and the notebook show
    assert ev.loc[0, "ppl"] == pytest.approx(sft["ppl"]) and "mc/tiny_mc/accuracy" in ev.columns
    assert not any(c.endswith("stderr") for c in ev.columns)
    logged = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("sft/ppl") == pytest.approx(sft["ppl"]) for r in logged)


def test_evaluate_stage_refuses_a_bad_suite_file_before_sampling(tiny_model_dir, tmp_path, monkeypatch):
    """A broken multiple-choice file is named (file, row, field) before any policy samples: minutes of sampling
    are not spent on a stage that would fail at its last step."""
    from prefopt.config import from_dict
    from prefopt.evaluate import recipe as R
    from prefopt.experiment import ExperimentConfig
    from prefopt.stage import run_stage

    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "E"}) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "Sort the numbers.", "input": "3 1 2"}) + "\n")
    cfg = from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "task": {"name": "none"},
        "stages": ["evaluate"],
        "evaluate": {"policies": {"sft": str(tiny_model_dir)}, "reward_model": "", "prompts": {"path": str(prompts)},
                     "samples_per_prompt": 1, "max_new_tokens": 4, "backend": "transformers",
                     "suite": {"multiple_choice": [str(bad)]}}})
    sampled = []
    monkeypatch.setattr(R, "sample_policy", lambda *a, **k: sampled.append(a) or {})
    with pytest.raises(DataError) as e:
        run_stage(cfg, "evaluate")
    assert e.value.path == str(bad) and e.value.row == 1 and not sampled


# ------------------------------------------------------------------------------------------------ lm-eval resume


def _fake_lm_eval(calls):
    """run_lm_eval's stand-in: counts calls; the figures are the ones its raw results hold (a group under
    "groups"), so a reused file must give them back by reading the raw results."""
    def run(path, cfg):
        calls.append((path, cfg.lm_eval_limit))
        raw = {"hellaswag,mmlu": {"results": {"hellaswag": {"acc,none": 0.1, "alias": "h",
                                                            "acc_stderr,none": 0.03125}},
                                  "groups": {"mmlu": {"acc,none": 0.4819, "acc_stderr,none": "N/A"}},
                                  "n-shot": {"hellaswag": 0}, "versions": {}, "configs": {}}}
        return {"lm_eval/hellaswag/acc": 0.1, "lm_eval/hellaswag/acc_stderr": 0.03125,
                "lm_eval/mmlu/acc": 0.4819}, raw
    return run


def test_lm_eval_reused_after_a_kill_unless_something_changed(tmp_path, monkeypatch):
    """A second `run_suite` over the same folder, settings and weights (a rerun after a kill) runs lm-eval for
    no policy and returns the same figures, read from lm_eval_<policy>.json; a changed limit, changed weights or
    a file without stored settings (an older run) reruns lm-eval for that policy only."""
    calls = []
    monkeypatch.setattr(S, "run_lm_eval", _fake_lm_eval(calls))
    policies = {}
    for name in ("sft", "dpo"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(name.encode())
        policies[name] = str(tmp_path / name)
    out = tmp_path / "evaluate"
    out.mkdir()
    cfg = SuiteConfig(lm_eval_tasks=["hellaswag", "mmlu"], lm_eval_num_fewshot={"mmlu": 5}, lm_eval_limit=0.5)
    logged = []
    tracker = SimpleNamespace(log=logged.append)
    first = S.run_suite(policies, cfg, out, tracker)
    assert len(calls) == 2 and first["sft"] == {"lm_eval/hellaswag/acc": 0.1, "lm_eval/hellaswag/acc_stderr": 0.03125,
                                                "lm_eval/mmlu/acc": 0.4819}
    stored = json.loads((out / "lm_eval_dpo.json").read_text())
    assert stored["_prefopt"]["tasks"] == ["hellaswag", "mmlu"] and stored["_prefopt"]["limit"] == 0.5
    assert stored["hellaswag,mmlu"]["groups"]["mmlu"]["acc,none"] == 0.4819  # the raw results, as before

    again = S.run_suite(policies, cfg, out, tracker)
    assert len(calls) == 2 and again == first and logged[2:] == logged[:2]

    S.run_suite(policies, SuiteConfig(lm_eval_tasks=["hellaswag", "mmlu"], lm_eval_num_fewshot={"mmlu": 5},
                                      lm_eval_limit=0.25), out, tracker)
    assert [c[1] for c in calls[2:]] == [0.25, 0.25]  # a changed setting: both rerun
    (tmp_path / "dpo" / "model.safetensors").write_bytes(b"retrained")
    S.run_suite(policies, SuiteConfig(lm_eval_tasks=["hellaswag", "mmlu"], lm_eval_num_fewshot={"mmlu": 5},
                                      lm_eval_limit=0.25), out, tracker)
    assert [c[0] for c in calls[4:]] == [policies["dpo"]]  # new weights: only that policy reruns
    raw = json.loads((out / "lm_eval_sft.json").read_text())
    del raw["_prefopt"]
    (out / "lm_eval_sft.json").write_text(json.dumps(raw))
    S.run_suite(policies, SuiteConfig(lm_eval_tasks=["hellaswag", "mmlu"], lm_eval_num_fewshot={"mmlu": 5},
                                      lm_eval_limit=0.25), out, tracker)
    assert [c[0] for c in calls[5:]] == [policies["sft"]]


def test_lm_eval_local_task_folder_edit_reruns(tmp_path, monkeypatch):
    """A local task folder whose YAML or data changed since the stored run is not the same evaluation."""
    calls = []
    monkeypatch.setattr(S, "run_lm_eval", _fake_lm_eval(calls))
    task = tmp_path / "task"
    shutil.copytree(LM_EVAL_TASK, task)
    cfg = SuiteConfig(lm_eval_tasks=[str(task)])
    tracker = SimpleNamespace(log=lambda m: None)
    S.run_suite({"sft": str(tmp_path / "absent-model")}, cfg, tmp_path, tracker)
    S.run_suite({"sft": str(tmp_path / "absent-model")}, cfg, tmp_path, tracker)
    assert len(calls) == 1
    with open(task / "tiny_mc.jsonl", "a") as f:
        f.write(json.dumps({"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "A"}) + "\n")
    S.run_suite({"sft": str(tmp_path / "absent-model")}, cfg, tmp_path, tracker)
    assert len(calls) == 2
