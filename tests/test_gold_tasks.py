"""Tasks as plug-ins: the built-in reverse and lookup tasks, a user's task module, reward functions, and the errors
a broken task or reward function gives."""

from __future__ import annotations

import random

import pytest

from prefopt.config import from_dict
from prefopt.data.loaders import load_preferences, load_prompts, load_sft
from prefopt.data.spec import DatasetSpec
from prefopt.experiment import ExperimentConfig
from prefopt.scoring.functions import load_reward_function
from prefopt.stage import run_stage
from prefopt.gold import TaskError, get_task
from prefopt.gold.base import FILES
from prefopt.gold.lookup import score_values
from prefopt.gold.reverse import MISTAKES as REVERSE_MISTAKES
from prefopt.gold.reverse import mistake, score_letters
from prefopt.io import read_jsonl


def experiment(tmp_path, **task):
    return from_dict(ExperimentConfig, {"name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"},
                                        "task": task})


def test_reverse_gold_score_hand_cases():
    xs = ["a", "b", "c"]
    assert score_letters(xs, "c b a") == 1.0
    assert score_letters(xs, " c b a\n") == 1.0
    assert score_letters(xs, "a b c") == pytest.approx(0.5 * 1 / 3)  # only the middle letter is in place
    assert score_letters(xs, "c b") == pytest.approx(0.5 * 2 / 3)  # two right of max length 3
    assert score_letters(xs, "c b a a") == pytest.approx(0.5 * 3 / 4)
    assert score_letters(xs, "") == 0.0
    rng = random.Random(0)
    for kind in REVERSE_MISTAKES:
        for _ in range(50):
            ys = rng.sample(list("abcdefgh"), rng.randint(2, 6))
            out = mistake(ys, kind, rng)
            if out is not None:
                assert score_letters(ys, " ".join(out)) < 1.0


def test_lookup_gold_score_hand_cases():
    x = "k=3 b=8 x=1 ? b x"
    assert score_values(x, "8 1") == 1.0
    assert score_values(x, "1 8") == 0.0  # right values, wrong order: no position right
    assert score_values(x, "8") == pytest.approx(0.5 * 1 / 2)
    assert score_values(x, "8 1 3") == pytest.approx(0.5 * 2 / 3)
    assert score_values("a=5 ? a", "5") == 1.0
    with pytest.raises(ValueError, match="no '\\?'"):
        score_values("a=5 b=2", "5")


@pytest.mark.parametrize("name", ["reverse", "lookup"])
def test_builtin_task_files(tmp_path, name):
    cfg = experiment(tmp_path, name=name, num_sft=1000, demo_accuracy=0.6, num_prompts=100, num_val_prompts=50,
                     num_test_prompts=50, num_preferences=1000, annotator_noise=0.1, distinct=True)
    summary = run_stage(cfg, "task")
    d = tmp_path / "t" / "task"
    files = {f: read_jsonl(d / f"{f}.jsonl") for f in FILES}
    assert [len(files[f]) for f in FILES] == [1000, 100, 50, 50, 1000]
    task = get_task(name)
    correct = [task.gold_score(r, r["output"]) == 1.0 for r in files["sft"]]
    assert sum(correct) / 1000 == pytest.approx(0.6, abs=0.05) and summary["sft_accuracy"] == sum(correct) / 1000
    prefs = files["preferences"]
    decided = [r for r in prefs if r["chosen_gold"] != r["rejected_gold"]]
    assert sum(r["chosen_gold"] < r["rejected_gold"] for r in decided) / len(decided) == pytest.approx(0.1, abs=0.03)
    assert all(r["chosen_gold"] == task.gold_score(r, r["chosen"]) for r in prefs)
    sets = [{r["input"] for r in files[f]} for f in FILES]
    assert sum(len(s) for s in sets) == len(set().union(*sets))  # disjoint inputs across the files
    assert len(load_sft(DatasetSpec(path=str(d / "sft.jsonl")))) == 1000
    assert len(load_preferences(DatasetSpec(path=str(d / "preferences.jsonl")))) == 1000
    row = load_prompts(DatasetSpec(path=str(d / "test_prompts.jsonl"))).rows[0]
    # the gold scorer reads the input from the loaded row's meta, not from the rendered prompt
    from prefopt.gold.lookup import LookupTask
    from prefopt.gold.reverse import ReverseTask

    right = {"reverse": ReverseTask, "lookup": LookupTask}[name].response_pool(row["meta"]["input"], random.Random(0))[0]
    assert "### Input" in row["prompt"] and task.gold_score(row, right) == 1.0
    assert task.gold_score(row, right + " " + right) < 1.0


def test_a_users_task_module_runs_through_the_task_stage(tmp_path):
    cfg = experiment(tmp_path, module="plugins.upper_task", num_sft=40, num_prompts=5, num_val_prompts=5,
                     num_test_prompts=5, num_preferences=30, min_len=3, max_len=5)
    summary = run_stage(cfg, "task")
    assert summary["task"] == "upper" and summary["source"] == "plugins.upper_task"
    sft = read_jsonl(tmp_path / "t" / "task" / "sft.jsonl")
    assert all(r["correct"] == (r["output"] == r["input"].upper()) for r in sft)
    task = get_task(cfg.task)
    assert task.gold_score({"input": "abc"}, "ABC") == 1.0
    assert task.gold_score({"meta": {"input": "abc"}}, "ABX") == pytest.approx(0.5 * 2 / 3)


def test_the_rotate_task_of_the_recipe_check_builds_its_data(tmp_path):
    """`plugins.rotate_task` (docs/methods.md's unseen-task check) builds its files; its demonstrations are right
    where marked, and its gold gives partial credit by position."""
    cfg = experiment(tmp_path, module="plugins.rotate_task", num_sft=60, num_prompts=5, num_val_prompts=5,
                     num_test_prompts=5, num_preferences=30, min_len=3, max_len=6)
    assert run_stage(cfg, "task")["task"] == "rotate"
    task = get_task(cfg.task)
    rows = read_jsonl(tmp_path / "t" / "task" / "sft.jsonl")
    gold = [task.gold_score({"input": r["input"]}, r["output"]) for r in rows]
    assert all(g == 1.0 for g, r in zip(gold, rows) if r["correct"])
    wrong = [g for g, r in zip(gold, rows) if not r["correct"]]
    assert wrong and sum(g < 1.0 for g in wrong) >= 0.8 * len(wrong)  # a copied `5 5 5` is still right
    assert task.gold_score({"input": "3 8 1 4"}, "8 1 4 3") == 1.0
    assert task.gold_score({"input": "3 8 1 4"}, "8 1 3 4") == pytest.approx(0.5 * 2 / 4)


def test_broken_task_modules_name_module_function_and_row(tmp_path):
    with pytest.raises(TaskError, match="task module 'plugins.nope' cannot be imported"):
        get_task(experiment(tmp_path, module="plugins.nope").task)
    with pytest.raises(TaskError, match="plugins.bad_tasks:NoScorer: has no `score`"):
        get_task(experiment(tmp_path, module="plugins.bad_tasks:NoScorer").task)
    task = get_task(experiment(tmp_path, module="plugins.bad_tasks:NaNTask").task)
    with pytest.raises(TaskError, match=r"plugins.bad_tasks:NaNTask: gold_score returned nan for prompt 'p-7'"):
        task.gold_score({"prompt_id": "p-7", "input": "abc"}, "ABC")


def test_reward_functions(tmp_path):
    cfg = experiment(tmp_path)
    gold = load_reward_function("task:gold", cfg.task)
    assert gold([{"prompt_id": "a", "meta": {"input": "3 1 2"}}, {"prompt_id": "b", "input": "2 1"}],
                ["1 2 3", "2 1"]) == [1.0, 0.0]
    length = load_reward_function("plugins.bad_tasks:reward_length")
    assert length([{"prompt_id": "a"}], ["x y z"]) == [3.0]
    with pytest.raises(TaskError, match="reward function plugins.bad_tasks:reward_nan returned nan for prompt 'q1'"):
        load_reward_function("plugins.bad_tasks:reward_nan")([{"prompt_id": "q0"}, {"prompt_id": "q1"}], ["a", "b"])
    with pytest.raises(TaskError, match=r"reward_vector returned '\[1.0, 2.0\]' for prompt 'q0': expected one number"):
        load_reward_function("plugins.bad_tasks:reward_vector")([{"prompt_id": "q0"}], ["a"])
    with pytest.raises(TaskError, match="expected module:function"):
        load_reward_function("justaname")
    with pytest.raises(TaskError, match="has no function 'missing'"):
        load_reward_function("plugins.bad_tasks:missing")
    none = experiment(tmp_path, name="none")
    with pytest.raises(TaskError, match="task:gold needs an experiment with a gold task"):
        load_reward_function("task:gold", none.task)
    import torch

    assert load_reward_function("plugins.bad_tasks:reward_length").fn({}, "a b") == 2.0
    from prefopt.scoring.functions import _one_number

    assert _one_number(torch.tensor(2.5)) == 2.5 and _one_number(torch.tensor([1.0])) is None
    # a 0-d tensor that is not finite is refused like a float one, naming the value and the prompt; a bool is not
    # a score (True would pass as 1.0)
    from prefopt.scoring.functions import RewardFunction

    for bad, shown in ((torch.tensor(float("inf")), "inf"), (torch.tensor(float("nan")), "nan")):
        with pytest.raises(TaskError, match=rf"reward function t:bad returned {shown} for prompt 'q0'"):
            RewardFunction("t:bad", lambda ex, r, bad=bad: bad)([{"prompt_id": "q0"}], ["a"])
    with pytest.raises(TaskError, match="returned 'True' for prompt 'q0': expected one number"):
        RewardFunction("t:bool", lambda ex, r: True)([{"prompt_id": "q0"}], ["a"])
    assert RewardFunction("t:ok", lambda ex, r: torch.tensor(-0.25))([{"prompt_id": "q0"}], ["a"]) == [-0.25]
