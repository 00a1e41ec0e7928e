"""`prefopt run`'s console: a start and an end line per stage, the rest in the stage's log; errors reach it whole."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_experiment, write_yaml

REPO = Path(__file__).resolve().parents[1]

CRASH_TASK = '''
import random
name = "crash"
instructions = ["Copy the word."]

def sample_input(rng, cfg):
    raise RuntimeError("boom in sample_input")

def score(input, response):
    return 1.0

def demo_mistake(input, rng):
    return input

def response_pool(input, rng):
    return [input]
'''


def prefopt(*args, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k != "PREFOPT_VERBOSE"}
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(extra_env or {})})
    return subprocess.run([sys.executable, "-m", "prefopt", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_run_prints_start_and_end_lines_and_logs_the_rest(tmp_path):
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["task", "base"]))
    root = tmp_path / "runs" / "tiny"
    out = prefopt("run", exp)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    # 2 stages x (start, end) + the W&B line + the experiment line; nothing on stderr (library warnings: the log)
    assert len(lines) <= 6, out.stdout
    assert out.stderr == ""
    for stage in ("task", "base"):
        log = root / "logs" / f"{stage}.log"
        assert f"[prefopt] {stage}: running (not run yet) -> {root / stage}; its output: {log}" in lines
        end = [ln for ln in lines if ln.startswith(f"[prefopt] {stage}: done in ")]
        assert len(end) == 1 and end[0].split(" -> ")[1].startswith(str(root / stage)), lines
    # the end lines carry the stage's figures from its summary.json
    assert "(num_sft 64, num_prompts 12, num_preferences 64)" in out.stdout
    assert "vocab_size 300" in out.stdout
    # what W&B printed went to the log, one console line says how to upload all the runs
    base_log = (root / "logs" / "base.log").read_text()
    assert "W&B offline run saved; upload later with: wandb sync" in base_log
    assert "W&B offline run saved" not in out.stdout
    assert f"[prefopt] W&B: 2 offline runs in group tiny; upload with: wandb sync {root}/*/wandb/offline-run-*" \
        in lines

    # each stage's W&B run: the experiment's group, the stage as job type, named experiment/stage, its summary
    from prefopt.runtime.tracking import read_offline_run

    run = read_offline_run(next((root / "base" / "wandb").glob("offline-run-*")))
    assert (run["group"], run["job_type"], run["name"]) == ("tiny", "base", "tiny/base")
    assert run["summary"]["vocab_size"] == 300 and run["config"]["base"]["hidden_size"] == 32

    # --verbose: the stage's whole output on the console again (and no log for it)
    out = prefopt("run", exp, "--from", "base", "--verbose")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "W&B offline run saved; upload later with: wandb sync" in out.stdout
    assert "its output:" not in out.stdout and "[prefopt] base: done in " in out.stdout
    assert (root / "logs" / "base.log").read_text() == base_log


def test_a_failing_stage_reaches_the_console(tmp_path):
    """A data error: its one line, last on stderr, no log tail. A crash: the traceback, the log's last lines and
    its path."""
    (tmp_path / "crash_task.py").write_text(CRASH_TASK)
    (tmp_path / "bad_row_task.py").write_text(CRASH_TASK.replace(
        'raise RuntimeError("boom in sample_input")',
        'print("noise from the task"); from prefopt.data.errors import DataError; '
        'raise DataError("words.txt", 2, "word", "empty")'))
    env = {"PYTHONPATH": str(tmp_path)}
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["task"], task={"module": "bad_row_task"}))
    out = prefopt("run", exp, extra_env=env)
    assert out.returncode == 3, out.stderr[-3000:]
    assert out.stderr == "prefopt: data error: words.txt, row 2, field 'word': empty\n"
    assert "[prefopt] task: running" in out.stdout and "task: done" not in out.stdout
    assert "noise from the task" not in out.stdout
    assert "noise from the task" in (tmp_path / "runs" / "tiny" / "logs" / "task.log").read_text()

    exp = write_yaml(tmp_path / "c.yaml", tiny_experiment(tmp_path, name="crash", stages=["task"],
                                                          task={"module": "crash_task"}))
    out = prefopt("run", exp, extra_env=env)
    log = tmp_path / "runs" / "crash" / "logs" / "task.log"
    assert out.returncode == 1, out.stderr[-3000:]
    assert "RuntimeError: boom in sample_input" in out.stderr and "Traceback" in out.stderr
    assert f"[prefopt] its whole output: {log}" in out.stderr
    assert out.stderr.rstrip().splitlines()[-1].startswith("prefopt: run crashed (RuntimeError)")


def test_stage_output_keeps_tagged_lines_and_logs_everything(tmp_path, capfd):
    """In this process: Python prints, raw writes to descriptors 1 and 2 and a child's output are all caught; the
    tagged lines reach the console on their own stream, in order; the log has every byte."""
    from prefopt.runtime.console import StageOutput

    log = tmp_path / "logs" / "x.log"
    with StageOutput(log, header="x (test)") as out:
        print("[prefopt] kept 1")
        print("{'loss': '0.5', 'epoch': '1'}")
        os.write(1, b"raw noise\n")
        subprocess.run(["sh", "-c", "echo '[prefopt] kept 2'; printf 'bar 1/2\\rbar 2/2\\r'; echo 'child noise' >&2"])
        sys.stderr.write("[pairs] WARNING: kept 3\nsome library warning\n")
        os.write(2, b"prefopt: data error: x.jsonl, row 2: bad\n")
    cap = capfd.readouterr()
    assert cap.out == "[prefopt] kept 1\n[prefopt] kept 2\n"
    assert cap.err == "[pairs] WARNING: kept 3\nprefopt: data error: x.jsonl, row 2: bad\n"
    assert out.error_shown and not out.crashed(RuntimeError("x"))
    text = log.read_bytes().decode()  # (read_text would turn a progress bar's \r into \n)
    assert text.startswith("==== ") and "x (test)" in text.splitlines()[0]
    for piece in ("{'loss': '0.5', 'epoch': '1'}", "raw noise", "bar 1/2\rbar 2/2\r", "child noise",
                  "some library warning", "[prefopt] kept 1"):
        assert piece in text
    # descriptors and streams are back: this reaches the test's capture, not the log
    print("after")
    os.write(2, b"after err\n")
    assert capfd.readouterr() == ("after\n", "after err\n") and "after" not in log.read_text()

    # verbose: nothing is caught, no log written
    with StageOutput(tmp_path / "logs" / "v.log", verbose=True):
        print("{'loss': 1}")
    assert capfd.readouterr().out == "{'loss': 1}\n" and not (tmp_path / "logs" / "v.log").exists()


def test_one_progress_line_per_stage_on_a_terminal(tmp_path, capfd):
    """With a terminal (forced here), the stage's progress bars become one redrawn line on stderr (\\r, count,
    elapsed, ETA), wiped before a line that stays and at the end; without one (a pipe, CI) nothing is redrawn."""
    from prefopt.runtime.console import StageOutput

    bars = "".join(f"sft:  {i * 10}%|#  | {i}/10 [00:{i:02d}<00:{10 - i:02d},  1.00it/s]\r" for i in range(1, 11))
    with StageOutput(tmp_path / "logs" / "sft.log", header="sft (not run yet)", progress=True):
        sys.stderr.write(bars)
        sys.stderr.flush()
        time.sleep(0.1)
        print("[prefopt] kept")
    cap = capfd.readouterr()
    assert cap.out == "[prefopt] kept\n"
    assert "\r[prefopt] sft: 1/10 (10%), 00:01 elapsed, ETA 00:09\x1b[K" in cap.err  # the first draw
    assert "\r[prefopt] sft: 10/10 (100%), 00:10 elapsed, ETA 00:00\x1b[K" in cap.err  # 100% always drawn
    assert cap.err.endswith("\r\x1b[K") and "5/10" not in cap.err  # throttled; wiped before the kept line
    with StageOutput(tmp_path / "logs" / "sft2.log", header="sft (x)"):  # not a terminal: no redraws
        sys.stderr.write(bars)
    assert capfd.readouterr().err == ""


def test_evaluate_end_line_gives_gold_else_rm_else_kl():
    """The evaluate end line's figure per policy: gold where the task has a gold scorer, else the win rate against
    reference answers (AlpacaEval's figure) where there are some, else the reward model's score, else the KL to the baseline (a run on one's own prompts with neither), never a row of dashes."""
    from prefopt.pipeline import key_figures

    gold = {"sft": {"gold_score": 0.7, "gold_score_se": 0.01, "rm_score": 1.0},
            "dpo": {"gold_score": 0.9, "gold_score_se": 0.02, "rm_score": 2.0}}
    assert key_figures("evaluate", {"policies": gold}) == "sft gold 0.700 ± 0.010, dpo gold 0.900 ± 0.020"
    rm = {"sft": {"rm_score": 1.0, "kl_to_sft": 0.0}, "dpo": {"rm_score": 2.5, "rm_score_se": 0.1, "kl_to_sft": 0.2}}
    assert key_figures("evaluate", {"policies": rm}) == "sft rm 1.000, dpo rm 2.500 ± 0.100"
    ref = {p: {**f, "win_rate_vs_ref": w, "win_rate_vs_ref_se": 0.03} for (p, f), w in zip(rm.items(), (0.25, 0.4))}
    assert key_figures("evaluate", {"policies": ref}) == "sft ref win 0.250 ± 0.030, dpo ref win 0.400 ± 0.030"
    kl = {"sft": {"kl_to_sft": 0.0}, "dpo": {"kl_to_sft": 0.02, "kl_to_sft_se": 0.012}}
    assert key_figures("evaluate", {"policies": kl}) == "sft KL 0.000, dpo KL 0.020 ± 0.012"
    assert key_figures("evaluate", {"policies": {"sft": {"length": 3}}}) == ""
    assert key_figures("generate", {"candidates": 96, "tokens_per_second": 5120.0}) == \
        "candidates 96, tokens_per_second 5,120"
