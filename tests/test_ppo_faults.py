"""PPO under the faults a cluster run meets: SIGTERM to a real `prefopt ppo` (Slurm's preemption), and checkpoints
that prove themselves (a truncated newest checkpoint falls back to the previous one; none valid starts over).

Tiny sizes (see tests/test_ppo.py): the tiny Llama as policy, a reward model from its backbone, 8 prompts a rollout.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from prefopt.runtime.faults import verify_manifest
from test_preemption import Run, assert_bit_identical, logged_steps
from test_ppo import prompts_file, rm_dir, write_config  # noqa: F401 - fixtures

LINE = re.compile(r"^prefopt: ppo preempted at step (\d+) \(signal SIGTERM\); iter-(\d+) saved; rerun the same "
                  r"command to resume$")


@pytest.mark.slow
def test_sigterm_during_ppo_saves_the_iteration_and_resumes_bit_identically(tmp_path, tiny_model_dir, rm_dir,
                                                                            prompts_file):
    """`prefopt ppo` (6 iterations, a checkpoint every 10) gets SIGTERM once iteration 2 is logged: it finishes the
    iteration in progress, saves iter-N of it (N = the logged one or the next: at most one iteration lost), exits
    143 within 10 s with one line and no traceback. The rerun resumes from iter-N and its final weights equal, bit
    for bit, those of a run nobody interrupted (run alongside)."""
    kw = {"total_episodes": 48, "save_every": 10}
    straight = write_config(tmp_path / "a", "e", tiny_model_dir, rm_dir, prompts_file, **kw)
    cut = write_config(tmp_path / "b", "e", tiny_model_dir, rm_dir, prompts_file, **kw)
    baseline = Run(tmp_path / "a", "ppo", str(straight))
    d = tmp_path / "b" / "e" / "ppo"
    run = Run(tmp_path / "b", "ppo", str(cut))
    deadline = time.time() + 240
    while logged_steps(d) < 2 and time.time() < deadline and run.proc.poll() is None:
        time.sleep(0.01)
    seen = logged_steps(d)
    run.proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    rc, err = run.wait(timeout=60)
    assert time.time() - t0 < 10, "ppo took over 10 s to stop after SIGTERM"
    assert rc == 143 and "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("prefopt:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-3000:]
    m = LINE.match(lines[0])
    assert m and m.group(1) == m.group(2), lines[0]
    step = int(m.group(1))
    assert seen >= 2 and seen <= step <= seen + 1 and step < 6
    assert step % 10, "a scheduled checkpoint: the test would not show the preemption's own save"
    assert verify_manifest(d / "checkpoints" / f"iter-{step}") is None
    assert not (d / "_DONE.json").exists() and not (d / "model").exists()

    rc, err = Run(tmp_path / "b", "ppo", str(cut)).wait()
    assert rc == 0, err[-3000:]
    assert f"[ppo] resuming from {d / 'checkpoints' / f'iter-{step}'} (iteration {step} of 6)" in (
        tmp_path / "b" / "stdout.txt").read_text()
    assert json.loads((d / "summary.json").read_text())["iterations"] == 6
    rc, err = baseline.wait()
    assert rc == 0, err[-3000:]
    assert_bit_identical(tmp_path / "a" / "e" / "ppo" / "model", d / "model")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, rm_dir, prompts_file):
    """One finished 3-iteration ppo run in this process (a checkpoint every iteration: iter-2 and iter-3 kept)."""
    from prefopt.experiment import load_config
    from prefopt.stage import run_stage

    root = tmp_path_factory.mktemp("finished")
    cfg = load_config(str(write_config(root, "t", tiny_model_dir, rm_dir, prompts_file, total_episodes=24)))
    run_stage(cfg, "ppo")
    return root


def resumable_copy(finished: Path, tmp_path: Path, tiny_model_dir, rm_dir, prompts_file):
    """The finished run copied, its marker and model removed: the stage is unfinished and resumes."""
    from prefopt.experiment import load_config

    shutil.copytree(finished / "t", tmp_path / "t")
    cfg = load_config(str(write_config(tmp_path, "t", tiny_model_dir, rm_dir, prompts_file, total_episodes=24)))
    d = tmp_path / "t" / "ppo"
    (d / "_DONE.json").unlink()
    shutil.rmtree(d / "model")
    return cfg, d


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_checkpoints_carry_a_manifest_and_two_are_kept(finished):
    ck = finished / "t" / "ppo" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["iter-2", "iter-3"]
    for name in ("iter-2", "iter-3"):
        assert verify_manifest(ck / name) is None
        listed = json.loads((ck / name / "manifest.json").read_text())["files"]
        assert {"trainer_state.pt", "state/model.safetensors", "state/optimizer.bin"} <= set(listed)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(finished, tmp_path, tiny_model_dir, rm_dir,
                                                                prompts_file, capsys):
    """iter-3's policy weights cut in half: the rerun names the file, resumes from iter-2, trains iteration 3
    again and ends with the uninterrupted run's weights, bit for bit; the iter-3 it leaves verifies."""
    from prefopt.stage import run_stage

    cfg, d = resumable_copy(finished, tmp_path, tiny_model_dir, rm_dir, prompts_file)
    bad = d / "checkpoints" / "iter-3" / "state" / "model.safetensors"
    truncate(bad)
    summary = run_stage(cfg, "ppo")
    out = capsys.readouterr().out
    assert f"checkpoint {d / 'checkpoints' / 'iter-3'} cannot be resumed: {bad} is " in out
    assert "truncated" in out and "trying the previous one" in out
    assert f"[ppo] resuming from {d / 'checkpoints' / 'iter-2'} (iteration 2 of 3)" in out
    assert summary["iterations"] == 3
    assert verify_manifest(d / "checkpoints" / "iter-3") is None
    assert_bit_identical(finished / "t" / "ppo" / "model", d / "model")


def test_no_valid_checkpoint_starts_over(finished, tmp_path, tiny_model_dir, rm_dir, prompts_file, capsys):
    """Both checkpoints damaged (iter-3's trainer state truncated, iter-2's manifest gone, as a save a kill cut
    short): a line for each, then "no valid checkpoint ... starting the stage over"; iterations 1-3 run again and
    end at the uninterrupted run's weights."""
    from prefopt.stage import run_stage

    cfg, d = resumable_copy(finished, tmp_path, tiny_model_dir, rm_dir, prompts_file)
    truncate(d / "checkpoints" / "iter-3" / "trainer_state.pt")
    (d / "checkpoints" / "iter-2" / "manifest.json").unlink()
    run_stage(cfg, "ppo")
    out = capsys.readouterr().out
    assert out.count("cannot be resumed") == 2 and "iter-2/manifest.json is missing or unreadable" in out
    assert "no valid checkpoint to resume from" in out and "starting the stage over" in out
    assert "[ppo] resuming" not in out
    assert_bit_identical(finished / "t" / "ppo" / "model", d / "model")
