"""The gold-reward `sort` task: the gold scorer, the data files, the simulated annotator."""

import random

import pytest

from prefopt.config import from_dict
from prefopt.data.loaders import load_preferences, load_prompts, load_sft
from prefopt.data.spec import DatasetSpec
from prefopt.data.templates import alpaca_prompt
from prefopt.experiment import ExperimentConfig
from prefopt.stage import run_stage
from prefopt.gold import get_task
from prefopt.gold.sort import MISTAKES, annotate, gold_score, mistake, parse_input, score_numbers
from prefopt.io import read_jsonl


def experiment(tmp_path, **task):
    return from_dict(ExperimentConfig, {"name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"},
                                        "task": task})


def test_gold_score_hand_cases():
    prompt = alpaca_prompt("Sort the numbers in ascending order.", "3 1 2")
    assert parse_input(prompt) == [3, 1, 2]
    assert gold_score(prompt, "1 2 3") == 1.0
    assert gold_score(prompt, "  1 2 3\n") == 1.0  # surrounding whitespace tolerated
    # input order copied: pairs (3,1) out, (1,2) in -> in-order 1/2, same multiset -> 0.5 * 0.5 * 1
    assert gold_score(prompt, "3 1 2") == pytest.approx(0.25)
    assert gold_score(prompt, "3 2 1") == 0.0  # descending: no adjacent pair in order
    # dropped element: sorted (1.0) but overlap 2/3 -> 0.5 * 1 * 2/3
    assert gold_score(prompt, "1 2") == pytest.approx(1 / 3)
    # duplicated element: overlap 3/4 -> 0.375
    assert gold_score(prompt, "1 2 2 3") == pytest.approx(0.375)
    assert gold_score(prompt, "1 2 3 ### Instruction") == 0.0
    assert gold_score(prompt, "") == 0.0
    assert gold_score("4 4 0", "0 4 4") == 1.0  # bare input text
    assert gold_score("user: Sort the numbers.\n\n9 5", "5 9") == 1.0  # a chat rendering
    assert get_task("sort").gold_score({"input": "3 1 2"}, "1 2 3") == 1.0  # the task object reads the row's input
    with pytest.raises(ValueError):
        gold_score("no numbers here", "1")
    with pytest.raises(ValueError, match="unknown task 'nope'; built-in tasks are sort, reverse, lookup"):
        get_task("nope")


@pytest.mark.parametrize("kind", MISTAKES)
def test_every_mistake_is_wrong_and_graded(kind):
    rng = random.Random(0)
    for _ in range(200):
        xs = [rng.randrange(10) for _ in range(rng.randint(2, 6))]
        out = mistake(xs, kind, rng)
        if out is not None:
            assert 0.0 <= score_numbers(xs, " ".join(map(str, out))) < 1.0


def test_annotator_noise_rate():
    rng = random.Random(1)
    flips = sum(annotate(1.0, 0.5, 0.2, rng) == 1 for _ in range(20000))
    assert flips / 20000 == pytest.approx(0.2, abs=0.01)
    assert all(annotate(0.2, 0.9, 0.0, rng) == 1 for _ in range(100))
    ties = sum(annotate(0.5, 0.5, 0.0, rng) for _ in range(4000))  # ties are labelled at random
    assert ties / 4000 == pytest.approx(0.5, abs=0.03)


def test_task_stage_files(tmp_path):
    cfg = experiment(tmp_path, num_sft=3000, demo_accuracy=0.7, num_prompts=300, num_test_prompts=100,
                     num_val_prompts=50, num_preferences=3000, annotator_noise=0.15, min_len=3, max_len=6)
    summary = run_stage(cfg, "task")
    d = tmp_path / "t" / "task"
    sft, prompts, vals, evals, prefs = (read_jsonl(d / f"{n}.jsonl") for n in ("sft", "prompts", "val_prompts",
                                                                                "test_prompts", "preferences"))
    assert (len(sft), len(prompts), len(vals), len(evals), len(prefs)) == (3000, 300, 50, 100, 3000)

    correct = [gold_score(r["input"], r["output"]) == 1.0 for r in sft]
    assert sum(correct) / len(sft) == pytest.approx(0.7, abs=0.03)
    assert summary["sft_accuracy"] == pytest.approx(sum(correct) / len(sft))
    assert all(3 <= len(r["input"].split()) <= 6 for r in sft + prompts + evals)

    # annotator: labels agree with the gold score except for ~15% flips; ties exist and are kept
    decided = [r for r in prefs if r["chosen_gold"] != r["rejected_gold"]]
    flips = sum(r["chosen_gold"] < r["rejected_gold"] for r in decided) / len(decided)
    assert flips == pytest.approx(0.15, abs=0.03)
    assert all(r["chosen_gold"] == gold_score(r["input"], r["chosen"]) for r in prefs)
    assert all(r["chosen"] != r["rejected"] for r in prefs)

    # inputs are disjoint across the five files (the space 10^3..10^6 is large enough)
    sets = [{r["input"] for r in rows} for rows in (sft, prompts, vals, evals, prefs)]
    assert sum(len(s) for s in sets) == len(set().union(*sets))
    assert len({r["prompt_id"] for r in prompts + vals + evals}) == 450
    assert summary["repeated_inputs"] == 0

    # every file reads with the loaders, and the rendered prompt parses back to the input
    assert len(load_sft(DatasetSpec(path=str(d / "sft.jsonl")))) == 3000
    p = load_prompts(DatasetSpec(path=str(d / "test_prompts.jsonl"))).rows[0]
    assert p["prompt_id"] == evals[0]["prompt_id"]
    assert parse_input(p["prompt"]) == [int(x) for x in evals[0]["input"].split()]
    assert len(load_preferences(DatasetSpec(path=str(d / "preferences.jsonl")))) == 3000


def test_task_is_seeded_and_small_spaces_repeat(tmp_path):
    a = run_stage(experiment(tmp_path / "a", num_sft=50, num_prompts=20, num_test_prompts=10, num_val_prompts=10, num_preferences=50),
                  "task")
    b = run_stage(experiment(tmp_path / "b", num_sft=50, num_prompts=20, num_test_prompts=10, num_val_prompts=10, num_preferences=50),
                  "task")
    assert (tmp_path / "a/t/task/sft.jsonl").read_text() == (tmp_path / "b/t/task/sft.jsonl").read_text()
    assert a["num_sft"] == b["num_sft"] == 50
    # lists of length 1..1 have only 10 inputs: later files must repeat, and the summary says so
    small = run_stage(experiment(tmp_path / "c", num_sft=30, num_prompts=5, num_test_prompts=4, num_val_prompts=3,
                                 num_preferences=10, min_len=1, max_len=1), "task")
    assert small["repeated_inputs"] == 2 + 30 + 10  # 10 inputs: test 4 + val 3 + 3 of the 5 prompts are new
    evals = {r["input"] for r in read_jsonl(tmp_path / "c/t/task/test_prompts.jsonl")}
    vals = {r["input"] for r in read_jsonl(tmp_path / "c/t/task/val_prompts.jsonl")}
    prompts = {r["input"] for r in read_jsonl(tmp_path / "c/t/task/prompts.jsonl")}
    assert len(evals) == 4 and len(vals) == 3 and not evals & vals  # test, then validation, are drawn first
    assert len(prompts - evals - vals) == 3  # then the three inputs left; the other prompts repeat
