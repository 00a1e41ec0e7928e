"""Preemption as Slurm does it: SIGTERM to a real `prefopt` process in the middle of training.

The stage finishes the step in progress, saves a checkpoint of that step, and exits 143 with one line; the rerun
resumes there and ends with weights bit-identical to a run nobody interrupted. `prefopt run` passes the signal on
to the stage it launched and shows the stage's line, not a traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pair_helpers import PY, REPO, write_pairs
from prefopt.runtime.faults import verify_manifest

LINE = re.compile(r"^prefopt: (\w+) preempted at step (\d+) \(signal SIGTERM\); checkpoint-(\d+) saved; rerun the "
                  r"same command to resume$")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


class Run:
    """A `prefopt` process whose stdout and stderr go to files (a pipe nobody reads could fill and stall it)."""

    def __init__(self, log_dir: Path, *args: str, session: bool = False):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.err_path = log_dir / f"stderr-{time.time_ns()}.txt"
        with open(log_dir / "stdout.txt", "a") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([PY, "-m", "prefopt", *args], cwd=REPO, env=ENV, stdout=out, stderr=err,
                                         start_new_session=session)

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        return rc, self.err_path.read_text()


def logged_steps(stage_dir: Path) -> int:
    """The newest step in the stage's metrics.jsonl (one line per logged step), 0 before the first."""
    try:
        lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(ln).get("step") or 0 for ln in lines if ln.strip().endswith("}")]
    return max(steps, default=0)


def sigterm_after(run: Run, stage_dir: Path, steps: int, timeout: float = 240, group: bool = False) -> int:
    """SIGTERM once the stage has logged `steps` steps (to the run's whole process group with `group`); the number
    logged when the signal went."""
    deadline = time.time() + timeout
    while time.time() < deadline and run.proc.poll() is None:
        seen = logged_steps(stage_dir)
        if seen >= steps:
            if group:
                os.killpg(run.proc.pid, signal.SIGTERM)
            else:
                run.proc.send_signal(signal.SIGTERM)
            return seen
        time.sleep(0.01)
    raise AssertionError(f"the stage never logged {steps} steps:\n{run.err_path.read_text()[-3000:]}")


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs by {(wa[k] - wb[k]).abs().max().item()}"


def check_preempted(run: Run, stage: str, stage_dir: Path, seen: int, total: int) -> int:
    """Exit 143 within 10 s, one `prefopt:` line, the last of stderr, no traceback; the checkpoint of the step it
    names is there and verifies, and that step is at most two after the one logged when the signal went (no step
    is lost: the checkpoint is of the step it stopped at; a step of these tiny runs takes ~50 ms, and `prefopt run`
    passes the signal on to the stage, so on a loaded machine one more step can finish first). Returns that step."""
    t0 = time.time()
    rc, err = run.wait(timeout=60)
    assert time.time() - t0 < 10, "the stage took over 10 s to stop after SIGTERM"
    assert rc == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("prefopt:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-3000:]
    m = LINE.match(lines[0])
    assert m, lines[0]
    assert m.group(1) == stage and m.group(2) == m.group(3)
    step = int(m.group(2))
    assert seen <= step <= seen + 2 and step < total
    ckpt = stage_dir / "checkpoints" / f"checkpoint-{step}"
    assert verify_manifest(ckpt) is None
    assert not (stage_dir / "_DONE.json").exists()
    return step


@pytest.mark.slow
def test_sigterm_to_prefopt_run_during_dpo_saves_and_resumes_bit_identically(tmp_path, tiny_model_dir):
    """`prefopt run` (dpo launched through `accelerate launch`, forked from the preloaded server) gets SIGTERM
    after 3 logged steps of 60, as Slurm sends it: to its whole process group, the forkserver included (that the
    server outlives it is checked in test_simple_launch.py). It passes the signal to the stage (in a session of its
    own), which
    saves checkpoint-N at the step it was in (N = 3 or 4, not a multiple of save_steps=25) and exits 143 with one
    line, shown once by `prefopt run`, which exits 143 too. The rerun resumes from checkpoint-N and its final
    weights equal, bit for bit, those of a run nobody interrupted."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=16)
    total = 60

    def cfg(name):
        return write_yaml(tmp_path / name / "e.yaml", {
            "name": "e", "output_dir": str(tmp_path / name / "runs"), "wandb": {"mode": "disabled"},
            "stages": ["dpo"], "launch": {"launcher": "accelerate", "num_processes": 1},
            "dpo": {"model": str(tiny_model_dir), "pairs": str(pairs), "max_steps": total,
                    "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 25,
                    "max_length": 128}})

    straight, cut = cfg("a"), cfg("b")
    baseline = Run(tmp_path / "a", "dpo", str(straight))  # alongside: it shares nothing with the interrupted run
    d = tmp_path / "b" / "runs" / "e" / "dpo"
    run = Run(tmp_path / "b", "run", str(cut), session=True)
    seen = sigterm_after(run, d, 3, group=True)
    step = check_preempted(run, "dpo", d, seen, total)

    rc, err = Run(tmp_path / "b", "run", str(cut)).wait()
    assert rc == 0, err[-3000:]
    # both runs' stage forked from the preloaded server (runtime/forkserver.py): what the signal reached
    assert (tmp_path / "b" / "stdout.txt").read_text().count("forked with its imports done") == 2
    summary = json.loads((d / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{step}") and summary["steps"] == total
    assert "loss" in summary and "rewards/margins" in summary  # kept across the resume
    rc, err = baseline.wait()
    assert rc == 0, err[-3000:]
    assert_bit_identical(tmp_path / "a" / "runs" / "e" / "dpo" / "model", d / "model")


@pytest.mark.slow
def test_sigterm_during_sft_saves_and_resumes_bit_identically(tmp_path, tiny_model_dir):
    """`prefopt sft` (the shared loop) gets SIGTERM after 3 logged steps of 40: the loop saves
    checkpoint-N at that step, the process exits 143 with one line, and the resumed run's final weights equal an
    uninterrupted run's bit for bit."""
    rows = [{"instruction": "Sort the numbers.", "input": " ".join(map(str, [(i * 7 + k * 3) % 10 for k in range(4)])),
             "output": " ".join(map(str, sorted((i * 7 + k * 3) % 10 for k in range(4))))} for i in range(32)]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(rows))
    total = 40

    def cfg(name):
        return write_yaml(tmp_path / name / "e.yaml", {
            "name": "e", "output_dir": str(tmp_path / name / "runs"), "wandb": {"mode": "disabled"},
            "stages": ["sft"],
            "sft": {"model": str(tiny_model_dir), "dataset": {"path": str(data)}, "max_steps": total,
                    "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 25,
                    "max_length": 256}})

    straight, cut = cfg("a"), cfg("b")
    baseline = Run(tmp_path / "a", "sft", str(straight))
    d = tmp_path / "b" / "runs" / "e" / "sft"
    run = Run(tmp_path / "b", "sft", str(cut))
    seen = sigterm_after(run, d, 3)
    step = check_preempted(run, "sft", d, seen, total)

    rc, err = Run(tmp_path / "b", "sft", str(cut)).wait()
    assert rc == 0, err[-3000:]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{step}") and summary["steps"] == total
    rc, err = baseline.wait()
    assert rc == 0, err[-3000:]
    assert_bit_identical(tmp_path / "a" / "runs" / "e" / "sft" / "model", d / "model")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, tiny_model_dir):
    """A two-process dpo launch (`prefopt run`, launch.num_processes 2, gloo on CPU) where SIGTERM reaches rank 1
    only: the ranks agree at the end of the step, both save their part of checkpoint-N (one RNG file each) and stop;
    `prefopt run` shows one line and exits 143; the rerun resumes from checkpoint-N and finishes."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=16)
    total = 40
    cfg = write_yaml(tmp_path / "e.yaml", {
        "name": "e", "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"}, "stages": ["dpo"],
        "launch": {"launcher": "accelerate", "num_processes": 2},
        "dpo": {"model": str(tiny_model_dir), "pairs": str(pairs), "max_steps": total,
                "per_device_train_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 25,
                "max_length": 128}})
    d = tmp_path / "runs" / "e" / "dpo"
    ENV["ACCELERATE_USE_CPU"] = "true"
    try:
        run = Run(tmp_path, "run", str(cfg))
        deadline = time.time() + 240
        while logged_steps(d) < 3 and time.time() < deadline and run.proc.poll() is None:
            time.sleep(0.01)
        rank1 = json.loads((d / "_ranks" / "rank-1.json").read_text())["pid"]
        os.kill(rank1, signal.SIGTERM)
        seen = logged_steps(d)
        rc, err = run.wait(timeout=120)
        assert rc == 143, err[-3000:]
        lines = [ln for ln in err.splitlines() if ln.startswith("prefopt:")]
        assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
        m = LINE.match(lines[0])
        assert m, lines
        step = int(m.group(2))
        assert seen <= step <= seen + 2 and step < total  # (a step may end between the signal and `seen`)
        ckpt = d / "checkpoints" / f"checkpoint-{step}"
        assert verify_manifest(ckpt) is None
        assert sorted(p.name for p in (ckpt / "state").glob("random_states_*.pkl")) == [
            "random_states_0.pkl", "random_states_1.pkl"]
        rc, err = Run(tmp_path, "run", str(cfg)).wait()
    finally:
        ENV.pop("ACCELERATE_USE_CPU")
    assert rc == 0, err[-3000:]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{step}") and summary["steps"] == total


@pytest.mark.slow
def test_a_killed_process_leaves_one_line_not_a_traceback(tmp_path, tiny_model_dir):
    """A two-process dpo launch where rank 1 is killed (SIGKILL, as the kernel's OOM killer does): `prefopt run`
    ends with exit code 6 and one line from rank 0 naming the lost peer process and the rerun, no gloo or torchrun
    traceback on the console; rank 0's traceback is in logs/dpo.log."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=16)
    cfg = write_yaml(tmp_path / "e.yaml", {
        "name": "e", "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"}, "stages": ["dpo"],
        "launch": {"launcher": "accelerate", "num_processes": 2},
        "dpo": {"model": str(tiny_model_dir), "pairs": str(pairs), "max_steps": 400,
                "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 1000, "max_length": 128}})
    d = tmp_path / "runs" / "e" / "dpo"
    ENV["ACCELERATE_USE_CPU"] = "true"
    try:
        run = Run(tmp_path, "run", str(cfg))
        deadline = time.time() + 240
        while logged_steps(d) < 3 and time.time() < deadline and run.proc.poll() is None:
            time.sleep(0.01)
        os.kill(json.loads((d / "_ranks" / "rank-1.json").read_text())["pid"], signal.SIGKILL)
        rc, err = run.wait(timeout=120)
    finally:
        ENV.pop("ACCELERATE_USE_CPU")
    assert rc == 6, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("prefopt:")]
    assert len(lines) == 1 and lines[0].startswith("prefopt: resource error: lost a peer process: rank 0 of 2"), lines
    assert "rerun the same command to resume" in lines[0]
    assert "Traceback" in (tmp_path / "runs" / "e" / "logs" / "dpo.log").read_text()


FAKE_PREFOPT = """#!/bin/bash
# stands in for `prefopt run`: says it started, then on SIGTERM prints the stage's line and exits 143
line="prefopt: dpo preempted at step 3 (signal SIGTERM); checkpoint-3 saved; rerun the same command to resume"
trap 'echo "$line" >&2; exit 143' TERM
echo "$@" > "$FAKE_DIR/args"
while :; do sleep 0.05; done
"""


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_sbatch_script_passes_the_signal_on_and_requeues(tmp_path, sig):
    """experiments/slurm/prefopt_run.sbatch gets USR1 (its --signal=B:USR1@120, before the time limit) or SIGTERM
    (a preemption): it sends SIGTERM to `prefopt run`, waits for it to exit 143 after its checkpoint, calls
    `scontrol requeue $SLURM_JOB_ID` and exits 143."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"prefopt": FAKE_PREFOPT, "scontrol": '#!/bin/bash\necho "$@" >> "$FAKE_DIR/scontrol"\n'}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = (REPO / "experiments" / "slurm" / "prefopt_run.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in script and "#SBATCH --requeue" in script
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1"}
    proc = subprocess.Popen(["bash", "experiments/slurm/prefopt_run.sbatch", "exp.yaml"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "args").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the script is in `wait` by now
    proc.send_signal(getattr(signal, f"SIG{sig}"))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert (tmp_path / "args").read_text().startswith("run exp.yaml --launch.launcher=accelerate")
    assert (tmp_path / "scontrol").read_text() == "requeue 4242\n"
    assert "prefopt: dpo preempted at step 3" in err and f"SIG{sig}: prefopt saved a checkpoint; requeueing" in err


@pytest.mark.parametrize("kind", ["classifier", "likelihood"])
def test_sigterm_during_reward_saves_and_resumes(tmp_path, tiny_model_dir, monkeypatch, kind):
    """Both reward kinds (both in the preference loop), run in this process: a real SIGTERM to this
    process once step 3 of 8 is logged stops the stage at step 3 or 4 with a checkpoint of that step; the rerun
    resumes there and saves the weights an uninterrupted run saves, bit for bit."""
    from prefopt.runtime import tracking
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.runtime.faults import PreemptedError
    from prefopt.stage import run_stage

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=32)

    def cfg(name):
        return from_dict(ExperimentConfig, {
            "name": name, "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"}, "stages": ["reward"],
            "reward": {"model": str(tiny_model_dir), "kind": kind, "dataset": {"path": str(pairs)}, "max_steps": 8,
                       "save_steps": 5, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                       "eval_fraction": 0.0, "test_fraction": 0.25, "max_length": 128, "min_eval_accuracy": 0}})

    run_stage(cfg("a"), "reward")
    log = tracking.Tracker.log

    def log_then_signal(self, metrics, step=None):
        log(self, metrics, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tracking.Tracker, "log", log_then_signal)
    with pytest.raises(PreemptedError) as e:
        run_stage(cfg("b"), "reward")
    monkeypatch.undo()
    step = e.value.step
    assert str(e.value) == (f"reward preempted at step {step} (signal SIGTERM); checkpoint-{step} saved; rerun the "
                            "same command to resume")
    assert e.value.exit_code == 143 and step in (3, 4)
    d = tmp_path / "runs" / "b" / "reward"
    assert verify_manifest(d / "checkpoints" / f"checkpoint-{step}") is None
    summary = run_stage(cfg("b"), "reward")
    assert summary["resumed_from"].endswith(f"checkpoint-{step}") and summary["train/steps"] == 8
    assert_bit_identical(tmp_path / "runs" / "a" / "reward" / "model", d / "model")


def test_signal_during_an_error_report_waits_then_acts_as_before(monkeypatch):
    """A stage that leaves StopSignals with an error: a SIGUSR1 in the next REPORT_GRACE seconds is held (its
    report must not be cut short), one after it goes to the handler from before the stage, as after `reported`."""
    from prefopt.runtime import faults

    got = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    try:
        with pytest.raises(RuntimeError):
            with faults.StopSignals("dpo"):
                raise RuntimeError("a lost peer")
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == []  # held while the error is reported
        monkeypatch.setattr(faults, "REPORT_GRACE", 0.0)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == [signal.SIGUSR1]  # past the grace: the old handler, put back
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == [signal.SIGUSR1] * 2
    finally:
        signal.signal(signal.SIGUSR1, old)


GEN_LINE = re.compile(r"^prefopt: generate preempted \(signal SIGTERM\); (\d+) of 12 shards written(, the one in "
                      r"progress dropped)?; rerun the same command to resume at shard (\d+)$")


@pytest.mark.slow
def test_sigterm_during_generate_drops_the_shard_and_the_rerun_resumes_there(tmp_path, tiny_model_dir):
    """`prefopt generate` (transformers backend, 12 shards of 2 prompts) gets SIGTERM once shard 2 is on disk: the
    shard being sampled is dropped (or, between shards, none is started), the process exits 143 within 10 s with
    one line saying how many shards are written and where the rerun resumes; every shard on disk is whole and no
    temporary file is left. The rerun resumes there and its shards equal an uninterrupted run's, byte for byte."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Sort the numbers {i} {i + 3} {i + 1}.", "input": ""})
                               + "\n" for i in range(24)))

    def cfg(name):
        return write_yaml(tmp_path / name / "e.yaml", {
            "name": "e", "output_dir": str(tmp_path / name / "runs"), "wandb": {"mode": "disabled"},
            "stages": ["generate"],
            "generate": {"model": str(tiny_model_dir), "prompts": {"path": str(prompts)}, "backend": "transformers",
                         "n": 2, "max_new_tokens": 48, "shard_size": 2, "batch_size": 2}})

    straight, cut = cfg("a"), cfg("b")
    baseline = Run(tmp_path / "a", "generate", str(straight))
    d = tmp_path / "b" / "runs" / "e" / "generate"
    run = Run(tmp_path / "b", "generate", str(cut))
    deadline = time.time() + 240
    while not (d / "shard-00002.jsonl").exists() and time.time() < deadline and run.proc.poll() is None:
        time.sleep(0.01)
    run.proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    rc, err = run.wait(timeout=60)
    assert time.time() - t0 < 10, "generate took over 10 s to stop after SIGTERM"
    assert rc == 143 and "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("prefopt:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-3000:]
    m = GEN_LINE.match(lines[0])
    assert m, lines[0]
    written, at = int(m.group(1)), int(m.group(3))
    assert 3 <= written == at < 12
    shards = sorted(p.name for p in d.glob("shard-*.jsonl"))
    assert shards == [f"shard-{k:05d}.jsonl" for k in range(written)]
    for name in shards:  # whole: every row parses, one per prompt
        assert len([json.loads(ln) for ln in (d / name).read_text().splitlines()]) == 2
    assert not [p.name for p in d.iterdir() if ".tmp" in p.name] and not (d / "_DONE.json").exists()

    rc, err = Run(tmp_path / "b", "generate", str(cut)).wait()
    assert rc == 0, err[-3000:]
    assert json.loads((d / "summary.json").read_text())["resumed_shards"] == written
    rc, err = baseline.wait()
    assert rc == 0, err[-3000:]
    a = tmp_path / "a" / "runs" / "e" / "generate"
    for k in range(12):
        assert (a / f"shard-{k:05d}.jsonl").read_bytes() == (d / f"shard-{k:05d}.jsonl").read_bytes(), k


SCORE_LINE = re.compile(r"^prefopt: score preempted \(signal SIGTERM\); (\d+) of 30 shards written(, the one in "
                        r"progress dropped)?; rerun the same command to resume at shard (\d+)$")


def write_candidate_shards(folder: Path, shards: int = 30, rows: int = 5) -> list[list[dict]]:
    """Generation's output at toy size: `shards` files of `rows` prompts x 4 candidates. "1 2 3" is a candidate of
    every row and each prompt is in two neighbouring shards, so the score cache serves later shards (which text a
    shard scores depends on what came before it)."""
    from prefopt.io import write_jsonl

    out = []
    for k in range(shards):
        chunk = []
        for i in range(rows):
            p = (k * rows + i) // 2  # rows 2j and 2j+1 share prompt j; with 5 rows a shard, pairs straddle two
            digits = " ".join(str((p * 7 + d * 3) % 10) for d in range(6))
            chunk.append({"prompt_id": f"r{k}-{i}", "prompt": f"### Instruction:\nSort {digits} (item {p}).\n\n### Response:\n",
                          "candidates": ["1 2 3", f"{digits} {i}", f"{i} " * 12, f"{digits[::-1]} {p}"],
                          "generator": {"sha256": "g"}})
        write_jsonl(folder / f"shard-{k:05d}.jsonl", chunk)
        out.append(chunk)
    return out


@pytest.mark.slow
def test_sigterm_during_score_drops_the_shard_and_the_rerun_resumes_there(tmp_path, tiny_model_dir):
    """`prefopt score` (a tiny classifier, 30 candidate shards) gets SIGTERM once shard 0 is on disk: the shard being
    scored is dropped (or, between shards, none is started), the process exits 143 within 10 s with one line saying
    how many shards are written and where the rerun resumes. Only whole shards are on disk, no temporary file, and
    the score cache holds whole lines: exactly the texts of the shards written, the first lines of an uninterrupted
    run's cache. The rerun resumes there, and its shards and cache equal an uninterrupted run's, byte for byte."""
    from prefopt.models.loading import load_reward_model, load_tokenizer, save_model
    from prefopt.dist.process import seed_everything

    seed_everything(0)
    rm = tmp_path / "rm"
    save_model(load_reward_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), rm)
    inputs = write_candidate_shards(tmp_path / "candidates")

    def cfg(name):
        return write_yaml(tmp_path / name / "e.yaml", {
            "name": "e", "output_dir": str(tmp_path / name / "runs"), "wandb": {"mode": "disabled"},
            "stages": ["score"],
            "score": {"reward_model": str(rm), "candidates": str(tmp_path / "candidates"), "rm_format": "policy",
                      "batch_size": 2}})

    straight, cut = cfg("a"), cfg("b")
    baseline = Run(tmp_path / "a", "score", str(straight))
    d = tmp_path / "b" / "runs" / "e" / "score"
    run = Run(tmp_path / "b", "score", str(cut))
    deadline = time.time() + 240
    while not (d / "shard-00000.jsonl").exists() and time.time() < deadline and run.proc.poll() is None:
        time.sleep(0.005)
    run.proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    rc, err = run.wait(timeout=60)
    assert time.time() - t0 < 10, "score took over 10 s to stop after SIGTERM"
    assert rc == 143 and "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("prefopt:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-3000:]
    m = SCORE_LINE.match(lines[0])
    assert m, lines[0]
    written, at = int(m.group(1)), int(m.group(3))
    assert 1 <= written == at < 30
    assert sorted(p.name for p in d.glob("shard-*.jsonl")) == [f"shard-{k:05d}.jsonl" for k in range(written)]
    for k in range(written):  # whole: one row per input row, a score per candidate
        rows = [json.loads(ln) for ln in (d / f"shard-{k:05d}.jsonl").read_text().splitlines()]
        assert [len(r["scores"]) for r in rows] == [len(r["candidates"]) for r in inputs[k]]
    assert not [p.name for p in d.iterdir() if ".tmp" in p.name] and not (d / "_DONE.json").exists()
    cache = tmp_path / "b" / "runs" / "e" / "cache" / "scores.jsonl"
    cut_cache = cache.read_bytes()
    assert cut_cache.endswith(b"\n") and all(json.loads(ln) for ln in cut_cache.splitlines())
    texts = {(r["prompt"], c) for chunk in inputs[:written] for r in chunk for c in r["candidates"]}
    assert len(cut_cache.splitlines()) == len(texts)  # the written shards' texts, none of the dropped shard's

    rc, err = Run(tmp_path / "b", "score", str(cut)).wait()
    assert rc == 0, err[-3000:]
    assert json.loads((d / "summary.json").read_text())["shards_skipped"] == written
    rc, err = baseline.wait()
    assert rc == 0, err[-3000:]
    a = tmp_path / "a" / "runs" / "e"
    for k in range(30):
        assert (a / "score" / f"shard-{k:05d}.jsonl").read_bytes() == (d / f"shard-{k:05d}.jsonl").read_bytes(), k
    straight_cache = (a / "cache" / "scores.jsonl").read_bytes()
    assert straight_cache.startswith(cut_cache) and cache.read_bytes() == straight_cache


EVAL_LINE = ("prefopt: evaluate preempted (signal SIGTERM); it keeps no partial results, so it is not marked done; "
             "rerun the same command to start it over")


@pytest.mark.slow
def test_sigterm_during_evaluate_stops_it_unmarked_and_the_rerun_finishes(tmp_path, tiny_model_dir):
    """`prefopt evaluate` (two policies, transformers backend) gets SIGTERM while it samples the second policy: it
    exits 143 within 10 s with one line, writes no table or summary, no completion marker and no temporary file. The
    rerun starts it over and writes what an uninterrupted run writes: the same samples and table."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Sort the numbers {i} {i + 3} {i + 1}.", "input": ""})
                               + "\n" for i in range(16)))

    def cfg(name):
        return write_yaml(tmp_path / name / "e.yaml", {
            "name": "e", "output_dir": str(tmp_path / name / "runs"), "wandb": {"mode": "disabled"},
            "task": {"name": "none"}, "stages": ["evaluate"],
            "evaluate": {"policies": {"sft": str(tiny_model_dir), "a": str(tiny_model_dir)}, "reward_model": "",
                         "prompts": {"path": str(prompts)}, "samples_per_prompt": 2, "max_new_tokens": 48,
                         "batch_size": 4, "backend": "transformers"}})

    straight, cut = cfg("a"), cfg("b")
    baseline = Run(tmp_path / "a", "evaluate", str(straight))
    d = tmp_path / "b" / "runs" / "e" / "evaluate"
    run = Run(tmp_path / "b", "evaluate", str(cut))
    deadline = time.time() + 240
    while "generate a" not in run.err_path.read_text() and time.time() < deadline and run.proc.poll() is None:
        time.sleep(0.01)  # the baseline policy is sampled, the second one is being sampled
    run.proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    rc, err = run.wait(timeout=60)
    assert time.time() - t0 < 10, "evaluate took over 10 s to stop after SIGTERM"
    assert rc == 143 and "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("prefopt:")]
    assert lines == [EVAL_LINE] and err.strip().splitlines()[-1] == EVAL_LINE, err[-3000:]
    assert not [p.name for p in d.iterdir() if p.name in ("_DONE.json", "summary.json", "table.md")
                or ".tmp" in p.name]

    rc, err = Run(tmp_path / "b", "evaluate", str(cut)).wait()
    assert rc == 0, err[-3000:]
    assert (d / "_DONE.json").exists()
    rc, err = baseline.wait()
    assert rc == 0, err[-3000:]
    a = tmp_path / "a" / "runs" / "e" / "evaluate"
    for name in ("samples_sft.jsonl", "samples_a.jsonl", "sft.json", "a.json", "table.md"):
        assert (a / name).read_bytes() == (d / name).read_bytes(), name
