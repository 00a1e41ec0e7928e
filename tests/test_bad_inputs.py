"""A corpus of bad inputs run through the CLI as a user would: each gives one line naming the key or the file, row
and field, with its exit code (config 2, data 3, lock 4, interrupted 130); no traceback; finished outputs survive.

The stages used are the cheap ones (`check`, `task`, `base` with a tiny model, and `reward` / `pairs`, which read
their data before any training). Most cases start `python -m prefopt` as a process; the bad data rows call the
same `prefopt.cli.main` in this process (a process each would spend its time importing TRL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_experiment, write_yaml

REPO = Path(__file__).resolve().parents[1]


def prefopt(*args, cwd=REPO, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("PREFOPT_LOCK_HELD", None)
    return subprocess.run([sys.executable, "-m", "prefopt", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli(*args) -> tuple[int, str]:
    """`prefopt ARGS` in this process: (exit code, stderr)."""
    import contextlib
    import io

    from prefopt.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def one_line_error(out, code: int) -> str:
    """The process failed with `code` and said so in exactly one stderr line starting with `prefopt:`."""
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("prefopt:")]
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------ config values


CONFIG_CASES = [
    ("--sft.learning_rate=-1", "sft.learning_rate: must be > 0, got -1.0"),
    ("--sft.learning_rate=nan", "sft.learning_rate: must be a finite number > 0, got nan"),
    ("--reward.learning_rate=.inf", "reward.learning_rate: must be a finite number > 0, got inf"),
    ("--dpo.beta=-0.1", "dpo.beta: must be > 0, got -0.1"),
    ("--simpo.beta=0", "simpo.beta: must be > 0, got 0.0"),
    ("--sft.num_train_epochs=-1", "sft.num_train_epochs: must be > 0, got -1.0"),
    ("--reward.per_device_train_batch_size=-2", "reward.per_device_train_batch_size: must be >= 1, got -2"),
    ("--dpo.gradient_accumulation_steps=0", "dpo.gradient_accumulation_steps: must be >= 1, got 0"),
    ("--sft.warmup_ratio=1.5", "sft.warmup_ratio: must be >= 0 and < 1, got 1.5"),
    ("--dpo.label_smoothing=0.5", "dpo.label_smoothing: must be >= 0 and < 0.5, got 0.5"),
    ("--ppo.gamma=1.5", "ppo.gamma: must be >= 0 and <= 1, got 1.5"),
    ("--ppo.kl_coef=-1", "ppo.kl_coef: must be >= 0, got -1.0"),
    ("--generate.top_p=0", "generate.top_p: must be > 0 and <= 1, got 0.0"),
    ("--generate.n=0", "generate.n: must be >= 1, got 0"),
    ("--evaluate.samples_per_prompt=0", "evaluate.samples_per_prompt: must be >= 1, got 0"),
    ("--sft.dataset.max_chars=0", "sft.dataset.max_chars: must be >= 1, got 0"),
    ("--sft.lora.r=0", "sft.lora.r: must be >= 1, got 0"),
    ("--iterations=0", "iterations: must be >= 1, got 0"),
    ("--launch.num_processes=0", "launch.num_processes: must be >= 1, got 0"),
    ("--dpo.loss_type=hinge", "dpo.loss_type: expected one of ['sigmoid', 'ipo', 'cdpo'], got 'hinge'"),
    ("--sft.learning_rate=fast", "sft.learning_rate: expected a number, got 'fast'"),
    ("--pairs.margin=nan", "pairs.margin: must be a finite number, got nan"),
    ("--name=", "name: must name the experiment's folder under output_dir, got ''"),
    ("--iterate_policy=sft", "iterate_policy: must be one of dpo, simpo, ppo; got 'sft'"),
]


@pytest.mark.parametrize("override,message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_check_refuses_bad_values(tmp_path, override, message):
    exp = write_yaml(tmp_path / "e.yaml", {"name": "x", "output_dir": str(tmp_path / "runs")})
    line = one_line_error(prefopt("check", exp, override), 2)
    assert line == f"prefopt: config error: {message}"


def test_misspelt_scheduler_lists_the_known_ones(tmp_path):
    from transformers.trainer_utils import SchedulerType

    from prefopt.training.fields import SCHEDULERS

    assert set(SCHEDULERS) == {s.value for s in SchedulerType}  # the list kept here is transformers' own
    exp = write_yaml(tmp_path / "e.yaml", {"name": "x", "sft": {"lr_scheduler_type": "cosin"}})
    line = one_line_error(prefopt("check", exp), 2)
    assert line.startswith("prefopt: config error: sft.lr_scheduler_type: must be one of linear, cosine, ")
    assert line.endswith("; got 'cosin'")


def test_broken_yaml_and_missing_file_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsft:\n  learning_rate: [1,\n")
    line = one_line_error(prefopt("check", bad), 2)
    assert line.startswith(f"prefopt: config error: {bad}: invalid YAML: ")
    line = one_line_error(prefopt("check", tmp_path / "nope.yaml"), 2)
    assert line == f"prefopt: config error: config file not found: {tmp_path / 'nope.yaml'}"


# ------------------------------------------------------------------------------------------ data rows


def _pref(prompt="Sort 3 1 2", chosen="1 2 3", rejected="3 2 1") -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


HINT = "; `skip_bad_rows: true` on this dataset skips such rows"
# (name, rows of the file (dict, or a raw line), the message after "FILE, ")
DATA_CASES = [
    ("chosen_equals_rejected", [_pref(), _pref(chosen="2 1 3", rejected="2 1 3")],
     "row 2, field 'rejected': same text as 'chosen': a pair with no preference to learn" + HINT),
    ("whitespace_chosen", [_pref(chosen=" \n\t ")], "row 1, field 'chosen': empty" + HINT),
    ("empty_rejected", [_pref(), _pref(rejected="")], "row 2, field 'rejected': empty" + HINT),
    ("missing_rejected", [{"prompt": "p", "chosen": "c"}], "row 1, field 'rejected': missing" + HINT),
    ("wrong_type", [_pref(chosen=3)], "row 1, field 'chosen': expected a string, got int" + HINT),
    ("lone_surrogate", ['{"prompt": "a\\ud800b", "chosen": "x", "rejected": "y"}'],
     "row 1, field 'prompt': contains a lone surrogate '\\ud800' at character 1 (not valid Unicode)" + HINT),
    ("invalid_json", [_pref(), '{"prompt": "p", "chosen": '], "row 2: invalid JSON: Expecting value" + HINT),
    ("deeply_nested", ['{"prompt": ' + "[" * 200000 + "]" * 200000 + "}"],
     "row 1: JSON nested too deeply to read" + HINT),
    ("over_long", [_pref(prompt="x" * 1_000_001)],
     "row 1, field 'prompt': 1,000,001 characters, over the limit max_chars=1,000,000 (raise the dataset's "
     "`max_chars` if such rows are intended)" + HINT),
    ("hh_empty_final_answer", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                                "rejected": "\n\nHuman: hi\n\nAssistant:"}],
     "row 1, field 'rejected': empty final answer" + HINT),
    ("not_an_object", [_pref(), '"just a string"'], "row 2: expected a JSON object, got str" + HINT),
]


@pytest.fixture(scope="module")
def reward_yaml(tmp_path_factory, tiny_model_dir):
    """A `reward` stage on the tiny model; it reads its data before building anything, so bad data fails fast."""
    d = tmp_path_factory.mktemp("reward")
    return d, write_yaml(d / "e.yaml", tiny_experiment(d, stages=["reward"], wandb={"mode": "disabled"},
                                                       reward={"model": str(tiny_model_dir), "max_steps": 1}))


@pytest.mark.parametrize("name,rows,message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_preference_rows(reward_yaml, name, rows, message):
    d, exp = reward_yaml
    path = _jsonl(d / f"{name}.jsonl", rows)
    code, err = cli("reward", exp, f"--reward.dataset.path={path}")
    assert (code, err) == (3, f"prefopt: data error: {path}, {message}\n")


def test_invalid_utf8_directory_and_missing_file(reward_yaml):
    d, exp = reward_yaml
    bad = d / "latin1.jsonl"
    bad.write_bytes(json.dumps(_pref()).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    line = one_line_error(prefopt("reward", exp, f"--reward.dataset.path={bad}"), 3)  # as a process, once
    assert line == (f"prefopt: data error: {bad}, row 2: not valid UTF-8 (invalid continuation byte at byte 15 of "
                    f"the line){HINT}")
    code, err = cli("reward", exp, f"--reward.dataset.path={d}")
    assert (code, err) == (3, f"prefopt: data error: {d}: is a directory, not a data file (name a .json/.jsonl file "
                              "inside it)\n")
    code, err = cli("reward", exp, f"--reward.dataset.path={d / 'nope.jsonl'}")
    assert (code, err) == (3, f"prefopt: data error: {d / 'nope.jsonl'}: file not found\n")


def test_non_finite_reward_score_is_a_data_error(tmp_path):
    """A NaN score (a broken reward model) stops `pairs` with the score file, row and candidate, before it writes."""
    gen, score = tmp_path / "gen", tmp_path / "score"
    gen.mkdir()
    score.mkdir()
    _jsonl(gen / "shard-00000.jsonl", [{"prompt_id": "a", "prompt": "p", "candidates": ["x", "y"]},
                                       {"prompt_id": "b", "prompt": "q", "candidates": ["x", "z"]}])
    rm = {"path": "rm", "sha256": "0"}
    _jsonl(score / "shard-00000.jsonl", [{"prompt_id": "a", "scores": [0.1, 0.2], "reward_model": rm},
                                         '{"prompt_id": "b", "scores": [0.3, NaN], "reward_model": {}}'])
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["pairs"], task={"name": "none"},
                                                          pairs={"generate": str(gen), "score": str(score)}))
    line = one_line_error(prefopt("pairs", exp), 3)
    assert line == (f"prefopt: data error: {score / 'shard-00000.jsonl'}, row 2, field 'scores[1]': not a finite "
                    "score (nan); check the reward model, then rerun the score stage")
    assert not (tmp_path / "runs" / "tiny" / "pairs" / "pairs.jsonl").exists()


# ------------------------------------------------------------------------------------------ finished work


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """`task` then `base` (tokenizer trained on an outside file and the task's SFT data), both finished."""
    d = tmp_path_factory.mktemp("finished")
    extra = d / "extra.jsonl"
    _jsonl(extra, [{"instruction": "Say hi.", "input": "", "output": "hi"}] * 5)
    exp = write_yaml(d / "e.yaml", tiny_experiment(d, stages=["task", "base"],
                                                   base={"tokenizer_data": ["stage:task/sft.jsonl", str(extra)]}))
    out = prefopt("run", exp)
    assert out.returncode == 0, out.stderr[-3000:]
    return d, exp, d / "runs" / "tiny", extra


def _plan(out) -> dict[str, str]:
    """Stage -> its state in `prefopt check`'s plan."""
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {}
    for ln in out.stdout.splitlines():
        parts = ln.split(None, 3)
        if len(parts) == 4 and parts[0] in ("task", "base"):
            rows[parts[0]] = parts[3]
    return rows


def test_failed_rerun_keeps_the_finished_result(finished):
    """A rerun that fails (here: a directory given as tokenizer data) leaves the finished model and its marker."""
    d, exp, root, extra = finished
    before = {p: p.read_bytes() for p in [root / "base" / "_DONE.json", root / "base" / "model" / "model.safetensors"]}
    line = one_line_error(prefopt("base", exp, f"--base.tokenizer_data=[{d}]"), 3)
    assert "is a directory" in line
    assert {p: p.read_bytes() for p in before} == before
    assert _plan(prefopt("check", exp)) == {"task": "skip (done)", "base": "skip (done)"}


def test_changed_and_missing_files_are_named_and_rerun(finished):
    d, exp, root, extra = finished
    sft = root / "task" / "sft.jsonl"
    original = sft.read_bytes()
    # an outside input changed: base reruns, and says which file
    text = extra.read_text()
    extra.write_text(text.replace("hi", "ho"))
    plan = _plan(prefopt("check", exp))
    assert plan["task"] == "skip (done)"
    assert plan["base"] == f"run (input file {extra.resolve()} changed since the stage ran)"
    extra.write_text(text)
    assert _plan(prefopt("check", exp))["base"] == "skip (done)"  # same content again (mtime differs): done
    # an output damaged after the fact: the stage reruns, and what read it waits for it
    sft.write_text("not what the task wrote\n")
    plan = _plan(prefopt("check", exp))
    assert plan["task"] == f"run (output {sft} changed since the stage finished)"
    assert plan["base"].startswith("run (input stage task must rerun (output ")
    sft.unlink()
    assert _plan(prefopt("check", exp))["task"] == f"run (output {sft} is missing since the stage finished)"
    out = prefopt("run", exp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"task: running (output {sft} is missing since the stage finished)" in out.stdout
    assert sft.read_bytes() == original  # the task is deterministic: the same file again...
    assert "base: finished with the same fingerprint, skipped" in out.stdout  # ...so base need not rerun
    assert not (root / ".task.next").exists() and not list(root.glob(".*.old"))


def test_killed_rerun_resumes_and_swaps_in(finished, monkeypatch):
    """A rerun over a finished result works in `.base.next`; killed there, the finished result stays; the next
    run finishes in `.next` and only then replaces it."""
    from prefopt.base import recipe
    from prefopt.experiment import load_config
    from prefopt.stage import run_stage, stage_status

    d, exp, root, extra = finished
    cfg = load_config(exp, ["--base.hidden_size=48", "--base.num_attention_heads=2", "--base.num_key_value_heads=2"])
    marker = (root / "base" / "_DONE.json").read_bytes()
    real = recipe.save_model

    def die(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(recipe, "save_model", die)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "base")
    assert (root / "base" / "_DONE.json").read_bytes() == marker  # the finished result is untouched
    assert (root / ".base.next" / "_FINGERPRINT").exists() and not (root / ".base.next" / "_DONE.json").exists()
    assert stage_status(cfg, "base") == (False, "its config (or an input stage's config) changed, resumes its "
                                                "unfinished rerun")
    monkeypatch.setattr(recipe, "save_model", real)
    summary = run_stage(cfg, "base")
    assert stage_status(cfg, "base") == (True, "finished, inputs and outputs unchanged")
    assert not (root / ".base.next").exists()
    assert json.loads((root / "base" / "model" / "config.json").read_text())["hidden_size"] == 48
    assert str(root / ".base.next") not in json.dumps(summary)
    # the original config is now the changed one: check says base reruns, because its config changed
    assert _plan(prefopt("check", exp))["base"] == "run (its config (or an input stage's config) changed)"


# ------------------------------------------------------------------------------------------ lock, exit codes


def test_stage_command_during_a_run_is_refused(tmp_path):
    from prefopt.pipeline import experiment_lock

    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["task"]))
    root = tmp_path / "runs" / "tiny"
    with experiment_lock(root):
        line = one_line_error(prefopt("task", exp), 4)
    assert line == (f"prefopt: lock error: {root} is in use by another prefopt run (pid {os.getpid()}); wait for it "
                    "or use another experiment name")
    assert not (root / "task").exists()


def test_data_error_code_survives_accelerate(reward_yaml):
    """`prefopt run` launching the stage through `accelerate launch`: the stage's own line and exit code 3, not
    accelerate's CalledProcessError traceback, and no advice to rerun (a rerun cannot fix the data)."""
    d, exp = reward_yaml
    path = _jsonl(d / "same.jsonl", [_pref(chosen="1 2", rejected="1 2")])
    out = prefopt("run", exp, "--launcher", "accelerate", f"--reward.dataset.path={path}")
    line = one_line_error(out, 3)
    assert line.startswith(f"prefopt: data error: {path}, row 1, field 'rejected': same text as 'chosen'")
    assert "rerun" not in out.stderr and "CalledProcessError" not in out.stderr


def test_interrupt_and_crash_codes(tmp_path, monkeypatch, capsys):
    """Interrupted: 130 and the advice to rerun; a crash: its traceback, exit 1 and the same advice."""
    import prefopt.stage
    from prefopt.cli import main

    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["task"]))

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prefopt.stage, "run_stage", interrupted)
    assert main(["task", str(exp)]) == 130
    err = capsys.readouterr().err
    assert err == "prefopt: interrupted: finished stages are kept; rerun the same command to resume\n"

    def crashed(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(prefopt.stage, "run_stage", crashed)
    assert main(["task", str(exp)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: out of memory" in err
    assert err.rstrip().splitlines()[-1] == ("prefopt: task crashed (RuntimeError); fix the cause above, then rerun "
                                             "the same command: finished stages are kept and the unfinished one "
                                             "resumes")


# ------------------------------------------------------------------------------------------ counts


def test_long_prompts_are_cut_from_the_left_or_dropped_and_said(tiny_model_dir, capsys):
    """A prompt filling max_length=16 keeps BOS + its last 7 tokens (16 // 2 = 8 in all); with `drop` it goes."""
    from prefopt.models.loading import load_tokenizer
    from prefopt.preference.data import tokenize_pairs

    tok = load_tokenizer(str(tiny_model_dir))
    long = {"prompt": "The quick brown fox jumps over the lazy dog. " * 4, "chosen": "1 2 3", "rejected": "3 2 1"}
    short = {"prompt": "Sort 3 1 2", "chosen": "1 2 3", "rejected": "3 2 1"}
    full = tok(long["prompt"])["input_ids"]
    assert len(full) > 16 and full[0] == tok.bos_token_id
    got = tokenize_pairs([long, short], tok, 16)
    assert got[0]["prompt_ids"] == [tok.bos_token_id] + full[-7:]
    assert got[1] == tokenize_pairs([short], tok, 16)[0]  # a prompt that fits is untouched
    assert got.stats == {"pairs_in": 2, "pairs": 2, "prompts_truncated": 1, "dropped_long_prompt": 0}
    assert ("[prefopt] WARNING: 1 of 2 pairs have a prompt that fills max_length=16 tokens: cut 1 prompts to their "
            "last 8 tokens (long_prompts: drop drops them); 2 pairs are trained on") in capsys.readouterr().out
    dropped = tokenize_pairs([long, short], tok, 16, "drop")
    assert len(dropped) == 1 and dropped.stats["dropped_long_prompt"] == 1
    assert "dropped 1; 1 pairs are trained on" in capsys.readouterr().out


def test_pairs_stage_prints_what_it_dropped_and_why(tmp_path):
    gen, score = tmp_path / "gen", tmp_path / "score"
    gen.mkdir()
    score.mkdir()
    rows = [{"prompt_id": "a", "prompt": "p", "candidates": ["x", "y"]},
            {"prompt_id": "b", "prompt": "q", "candidates": ["x", "z"]},
            {"prompt_id": "c", "prompt": "r", "candidates": ["u", "v"]}]
    _jsonl(gen / "shard-00000.jsonl", rows)
    rm = {"path": "rm", "sha256": "0"}
    _jsonl(score / "shard-00000.jsonl", [{"prompt_id": "a", "scores": [0.1, 0.2], "reward_model": rm},
                                         {"prompt_id": "b", "scores": [0.3, 0.3], "reward_model": rm}])
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["pairs"], task={"name": "none"},
                                                          pairs={"generate": str(gen), "score": str(score),
                                                                 "margin": 0.0}))
    out = prefopt("run", exp)
    assert out.returncode == 0, out.stderr[-3000:]
    said = "pairs: 1 prompts without a pair (missing_scores); 1 prompts without a pair (all_tied)"
    assert out.stdout.count(f"[prefopt] {said}") == 2  # at the end of the stage, and under the final table
    summary = json.loads((tmp_path / "runs" / "tiny" / "pairs" / "summary.json").read_text())
    assert summary["counts"] == {"prompts without a pair (missing_scores)": 1, "prompts without a pair (all_tied)": 1}
    assert summary["pairs"] == 1


def test_skipped_and_deduplicated_rows_are_counted(reward_yaml, capsys):
    """`skip_bad_rows` and `dedup`: the stage goes on, prints both counts with their reasons and records them."""
    d, exp = reward_yaml
    good = [_pref(prompt=f"Sort {i} 1 2") for i in range(20)]  # 2 prompts each in the test and validation splits
    path = _jsonl(d / "mixed.jsonl", good + [_pref(chosen=""), good[0], '{"broken', _pref(chosen="1", rejected="1")])
    code, err = cli("reward", exp, f"--reward.dataset.path={path}", "--reward.dataset.skip_bad_rows=true",
                    "--reward.dataset.dedup=true", "--reward.min_eval_accuracy=0")
    assert code == 0, err[-3000:]
    out = capsys.readouterr().out
    assert "[prefopt] reward: 3 rows skipped as bad (skip_bad_rows) in mixed.jsonl; 1 duplicate rows dropped (dedup) " \
           "in mixed.jsonl" in out
    summary = json.loads((d / "runs" / "tiny" / "reward" / "summary.json").read_text())
    assert summary["counts"] == {"rows skipped as bad (skip_bad_rows) in mixed.jsonl": 3,
                                 "duplicate rows dropped (dedup) in mixed.jsonl": 1}


def test_a_stage_whose_input_stage_never_finished_is_refused(tmp_path):
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["task", "base"]))
    root = tmp_path / "runs" / "tiny"
    line = one_line_error(prefopt("run", exp, "--only", "base"), 3)
    assert line == (f"prefopt: data error: {root / 'task'}: input stage task of base has not finished; run it first "
                    f"(prefopt run {exp.resolve()} --only task)")
    assert one_line_error(prefopt("base", exp), 3) == line


def test_missing_local_model_is_one_line(reward_yaml, tmp_path):
    d, exp = reward_yaml
    path = _jsonl(d / "good.jsonl", [_pref()])
    code, err = cli("reward", exp, f"--reward.dataset.path={path}", f"--reward.model={tmp_path / 'nope'}")
    assert (code, err) == (3, f"prefopt: data error: {tmp_path / 'nope'}: model folder not found\n")


def test_output_dir_that_is_a_file(tmp_path):
    exp = tmp_path / "e.yaml"
    write_yaml(exp, tiny_experiment(tmp_path, stages=["task"], output_dir=str(exp)))
    line = one_line_error(prefopt("run", exp), 2)
    assert line == f"prefopt: config error: output_dir: cannot make the experiment folder {exp}/tiny: Not a directory"


def test_one_pretty_printed_object_is_not_rows(reward_yaml):
    d, exp = reward_yaml
    path = d / "wrapped.json"
    path.write_text(json.dumps({"data": [_pref()]}, indent=2))
    code, err = cli("reward", exp, f"--reward.dataset.path={path}")
    assert (code, err) == (3, f"prefopt: data error: {path}: is one JSON object (keys ['data']), not rows: expected a "
                              "JSON array of rows or one JSON object per line (JSONL)\n")


def test_deleted_shard_is_noticed_and_only_it_is_redone(tmp_path, tiny_model_dir):
    """A generate shard deleted after the stage finished: status names it; the rerun (in `.generate.next`, the
    finished folder untouched until it ends) reuses the intact shards and writes just the missing one; `fresh`
    (`prefopt run --from generate`) writes them all."""
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.stage import run_stage, stage_status

    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"Sort {i} {i + 2} {i + 1}.", "input": ""}
                                                  for i in range(6)])
    cfg = from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"}, "stages": ["generate"],
        "generate": {"model": str(tiny_model_dir), "prompts": {"path": str(prompts)}, "backend": "transformers",
                     "n": 2, "max_new_tokens": 4, "shard_size": 2, "batch_size": 2}})
    assert run_stage(cfg, "generate")["shards"] == 3
    d = tmp_path / "runs" / "t" / "generate"
    shards = {p.name: p.read_bytes() for p in d.glob("shard-*.jsonl")}
    (d / "shard-00001.jsonl").unlink()
    assert stage_status(cfg, "generate") == (False, f"output {d / 'shard-00001.jsonl'} is missing since the stage "
                                                    "finished")
    summary = run_stage(cfg, "generate")
    assert summary["resumed_shards"] == 2 and summary["shards"] == 3
    assert {p.name: p.read_bytes() for p in d.glob("shard-*.jsonl")} == shards
    assert stage_status(cfg, "generate")[0] and not (d.parent / ".generate.next").exists()
    assert run_stage(cfg, "generate", fresh=True)["resumed_shards"] == 0


@pytest.mark.shared_data
def test_real_hh_row_says_how_to_skip_it():
    """Anthropic HH harmless-base test split: row 87's chosen transcript ends with an empty answer."""
    from prefopt.data.errors import DataError
    from prefopt.data.loaders import load_preferences
    from prefopt.data.spec import DatasetSpec

    path = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    with pytest.raises(DataError) as e:
        load_preferences(DatasetSpec(path=str(path)))
    assert str(e.value) == f"{path}, row 87, field 'chosen': empty final answer{HINT}"
    assert load_preferences(DatasetSpec(path=str(path), skip_bad_rows=True)).skipped == 9


def test_a_kill_between_the_two_renames_is_completed(finished):
    """A rerun finished in `.task.next` and was killed after moving the old result aside: the next run completes
    the swap and finds the stage done."""
    import shutil

    d, exp, root, extra = finished
    shutil.copytree(root / "task", root / ".task.next")
    os.rename(root / "task", root / ".task.old")
    out = prefopt("run", exp, "--only", "task")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "task: finished with the same fingerprint, skipped" in out.stdout
    assert (root / "task" / "_DONE.json").exists()
    assert not (root / ".task.next").exists() and not (root / ".task.old").exists()


def test_empty_answers_only_in_pairs_the_pipeline_built(tmp_path, tiny_model_dir):
    """A sampled candidate may be empty (EOS first) in the pairs stage's file; in a user's pairs file it is a broken
    row, as is a whitespace-only one."""
    from prefopt.data.errors import DataError
    from prefopt.models.loading import load_tokenizer
    from prefopt.preference.data import load_pairs

    tok = load_tokenizer(str(tiny_model_dir))
    user = _jsonl(tmp_path / "mine.jsonl", [_pref(), _pref(chosen="  ")])
    with pytest.raises(DataError, match=r"mine\.jsonl, row 2, field 'chosen': empty"):
        load_pairs(str(user), "alpaca", tok)
    built = tmp_path / "pairs"
    built.mkdir()
    _jsonl(built / "pairs.jsonl", [_pref(), _pref(chosen="")])
    (built / "_FINGERPRINT").write_text("abc\n")
    assert [r["chosen"] for r in load_pairs(str(built), "alpaca", tok)] == ["1 2 3", ""]


@pytest.mark.slow
def test_data_error_code_survives_a_two_process_launch(reward_yaml):
    """`--multi_gpu --num_processes 2` on CPU: torchrun's failure report is not shown after the stage's line."""
    d, exp = reward_yaml
    path = _jsonl(d / "same2.jsonl", [_pref(chosen="1 2", rejected="1 2")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "true"}
    out = subprocess.run([sys.executable, "-m", "prefopt", "run", str(exp), "--launcher", "accelerate",
                          "--launch.num_processes=2", f"--reward.dataset.path={path}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    line = one_line_error(out, 3)
    assert line.startswith(f"prefopt: data error: {path}, row 1, field 'rejected': same text as 'chosen'")
    assert "ChildFailedError" not in out.stderr and "rerun" not in out.stderr


def test_from_reruns_a_finished_stage_beside_it(tmp_path):
    """`--from task` reruns a finished task from scratch in `.task.next` and swaps it in when it finishes."""
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["task"], wandb={"mode": "disabled"}))
    root = tmp_path / "runs" / "tiny"
    assert prefopt("run", exp).returncode == 0
    before = json.loads((root / "task" / "_DONE.json").read_text())
    out = prefopt("run", exp, "--from", "task")
    assert out.returncode == 0 and f"task: running (--from) -> {root / 'task'}" in out.stdout
    after = json.loads((root / "task" / "_DONE.json").read_text())
    assert after["finished"] > before["finished"] and after["outputs_digest"] == before["outputs_digest"]
    assert not (root / ".task.next").exists() and not (root / ".task.old").exists()


def test_check_reports_a_directory_as_data_path(tmp_path):
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["task", "base", "sft"]))
    out = prefopt("check", exp, f"--sft.dataset.path={tmp_path}")
    assert out.returncode == 2
    assert out.stdout.splitlines()[-2:] == [f"ERROR: sft.dataset.path: '{tmp_path}' is a directory, not a data file",
                                            "1 problem(s)"]


def test_a_hub_model_that_cannot_be_had_is_one_line(reward_yaml, monkeypatch):
    """A Hub id not in the local cache with no network (or a typo, a gated repo): transformers' OSError traceback
    becomes one line naming the id, the cache and how to get it, for tokenizer, causal LM and reward model."""
    d, exp = reward_yaml
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network attempt here: the cache decides
    path = _jsonl(d / "good.jsonl", [_pref()])
    code, err = cli("reward", exp, f"--reward.dataset.path={path}", "--reward.model=prefopt-tests/no-such-model")
    assert code == 3 and err.startswith("prefopt: data error: prefopt-tests/no-such-model: no local folder of that "
                                        "name, and as a Hub model id it could not be loaded (")
    assert err.count("\n") == 1 and "huggingface-cli download prefopt-tests/no-such-model" in err
    from prefopt.data.errors import DataError
    from prefopt.models.loading import load_causal_lm, load_reward_model

    for load in (load_causal_lm, load_reward_model):
        with pytest.raises(DataError, match="as a Hub model id it could not be loaded"):
            load("prefopt-tests/no-such-model")


def test_a_missing_model_folder_stops_run_before_any_stage_and_check_warns(tmp_path):
    """`prefopt check` may check a config for another machine: a local model folder missing here is a warning;
    `prefopt run` runs here, so it stops before the first stage, naming the key (not hours later, at the stage
    that loads it)."""
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["task", "base", "sft"]))
    gone = tmp_path / "gone"
    out = prefopt("check", exp, f"--sft.model={gone}")
    assert out.returncode == 0 and f"WARNING: sft.model: model folder '{gone}' does not exist here (fine if " \
                                   "the GPU machine has it)" in out.stdout
    line = one_line_error(prefopt("run", exp, f"--sft.model={gone}"), 2)
    assert line == f"prefopt: config error: sft.model: model folder '{gone}' does not exist"
    assert not (tmp_path / "runs" / "tiny" / "task").exists()
    line = one_line_error(prefopt("run", exp, f"--sft.dataset.path={tmp_path / 'none.jsonl'}"), 2)
    assert line == f"prefopt: config error: sft.dataset.path: file '{tmp_path / 'none.jsonl'}' does not exist"


def test_check_names_a_stage_file_no_stage_writes(tmp_path):
    """The defaults read the task's files: with `task.name: none` (or evaluate without `task` among the stages) the
    file would be missing hours into a run; `check` (and so `run`, before any stage) names the key instead."""
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["task", "base", "sft"]))
    out = prefopt("check", exp, "--task.name=none")
    none = "but task.name is none, so the task stage writes no files"
    assert out.returncode == 2 and out.stdout.splitlines()[-3:] == [
        f"ERROR: base.tokenizer_data[0]: reads stage:task/sft.jsonl, {none}: set base.tokenizer_data to your own "
        "files", f"ERROR: sft.dataset.path: reads stage:task/sft.jsonl, {none}: name your own data (sft.dataset: "
        "{path: FILE})", "2 problem(s)"]
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    exp = write_yaml(tmp_path / "e2.yaml", tiny_experiment(tmp_path, name="t2", stages=["base", "sft", "evaluate"],
                                                           sft={"dataset": {"path": str(data)}},
                                                           base={"tokenizer_data": [str(data)]}))
    out = prefopt("check", exp)
    assert out.returncode == 2 and "ERROR: evaluate.prompts.path: reads stage:task/test_prompts.jsonl, but 'task' " \
                                   "is not in this experiment's stages" in out.stdout
    # validation prompts are read only with split validation; files an earlier run left are there to read
    (tmp_path / "runs" / "t2" / "task").mkdir(parents=True)
    (tmp_path / "runs" / "t2" / "task" / "test_prompts.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    assert prefopt("check", exp).returncode == 0
    out = prefopt("check", exp, "--evaluate.split=validation")
    assert out.returncode == 2 and "evaluate.validation_prompts.path: reads stage:task/val_prompts.jsonl" in out.stdout
