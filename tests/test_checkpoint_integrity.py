"""Checkpoints, caches and finished stages that prove themselves, and resource faults named in one line.

The preference loop (dpo here) runs in this process: 6 steps, a checkpoint every 2. Each test copies that
finished run, removes its completion marker (so the stage resumes, as after a kill), damages a file, and reruns.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from pair_helpers import write_config, write_pairs
from prefopt.runtime.faults import verify_manifest

SECTION = {"max_steps": 6, "save_steps": 2, "save_total_limit": 2, "per_device_train_batch_size": 4,
           "learning_rate": 1e-3, "logging_steps": 1, "max_length": 128}


def load(tmp_path: Path, tiny_model_dir, pairs: Path, name: str = "t", **kw):
    from prefopt.experiment import load_config

    section = {"model": str(tiny_model_dir), "pairs": str(pairs), **SECTION, **kw}
    return load_config(str(write_config(tmp_path, "dpo", section, name=name)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """(folder, pairs file) of one finished 6-step dpo run."""
    from prefopt.stage import run_stage

    root = tmp_path_factory.mktemp("finished")
    pairs = write_pairs(root / "pairs.jsonl", n=16)
    run_stage(load(root, tiny_model_dir, pairs), "dpo")
    return root, pairs


def resumable_copy(finished, tmp_path, tiny_model_dir):
    """The finished run copied under tmp_path, its marker removed: the stage is unfinished and resumes."""
    root, pairs = finished
    shutil.copytree(root / "runs", tmp_path / "runs")
    cfg = load(tmp_path, tiny_model_dir, pairs)
    d = tmp_path / "runs" / "t" / "dpo"
    (d / "_DONE.json").unlink()
    return cfg, d


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoints_are_whole_hashed_and_keep_two_states(finished):
    """Every checkpoint has a manifest that verifies; the newest two keep `state/` (the fallback can resume);
    no temporary folder is left; the manifest names the files it hashed."""
    d = finished[0] / "runs" / "t" / "dpo" / "checkpoints"
    names = sorted(p.name for p in d.iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]  # save_total_limit 2
    for name in names:
        assert verify_manifest(d / name) is None
        assert (d / name / "state" / "optimizer.bin").exists()
    assert "state/model.safetensors" in (d / "checkpoint-6" / "manifest.json").read_text()


@pytest.mark.parametrize("damaged", ["model.safetensors", "state/model.safetensors"])
def test_truncated_newest_checkpoint_falls_back_to_the_previous(finished, tmp_path, tiny_model_dir, capsys,
                                                                damaged):
    """The newest checkpoint's model (or its state's weights) cut in half: the rerun says which file is bad,
    resumes from checkpoint-4, trains steps 5-6 again and ends with the uninterrupted run's weights, bit for bit;
    the checkpoint-6 it leaves verifies."""
    from prefopt.stage import run_stage

    cfg, d = resumable_copy(finished, tmp_path, tiny_model_dir)
    truncate(d / "checkpoints" / "checkpoint-6" / damaged)
    summary = run_stage(cfg, "dpo")
    out = capsys.readouterr().out
    bad = d / "checkpoints" / "checkpoint-6" / damaged
    assert f"cannot be resumed: {bad} is " in out and "truncated" in out and "trying the previous one" in out
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["steps"] == 6
    assert "loss" in summary
    assert verify_manifest(d / "checkpoints" / "checkpoint-6") is None
    same_weights(finished[0] / "runs" / "t" / "dpo" / "model", d / "model")


def test_no_valid_checkpoint_starts_over(finished, tmp_path, tiny_model_dir, capsys):
    """Both checkpoints damaged (4's state, 6's model): one line per bad file, then "no valid checkpoint ...
    starting the stage over"; the stage trains from step 0 and ends where the uninterrupted run ended."""
    from prefopt.stage import run_stage

    cfg, d = resumable_copy(finished, tmp_path, tiny_model_dir)
    truncate(d / "checkpoints" / "checkpoint-6" / "model.safetensors")
    truncate(d / "checkpoints" / "checkpoint-4" / "state" / "optimizer.bin")
    summary = run_stage(cfg, "dpo")
    out = capsys.readouterr().out
    assert out.count("cannot be resumed") == 2 and "checkpoint-4/state/optimizer.bin is" in out
    assert "no valid checkpoint to resume from" in out and "starting the stage over" in out
    assert summary["resumed_from"] is None and summary["steps"] == 6
    same_weights(finished[0] / "runs" / "t" / "dpo" / "model", d / "model")


def test_save_cut_by_a_kill_leaves_the_previous_checkpoints_usable(finished, tmp_path, tiny_model_dir, capsys):
    """A kill during the save of checkpoint-6 leaves `.tmp-checkpoint-6/` (half written) and no checkpoint-6: the
    rerun removes the temporary folder and resumes from checkpoint-4."""
    from prefopt.stage import run_stage

    cfg, d = resumable_copy(finished, tmp_path, tiny_model_dir)
    ck = d / "checkpoints"
    os.rename(ck / "checkpoint-6", ck / ".tmp-checkpoint-6")
    (ck / ".tmp-checkpoint-6" / "manifest.json").unlink()
    truncate(ck / ".tmp-checkpoint-6" / "state" / "optimizer.bin")
    summary = run_stage(cfg, "dpo")
    assert summary["resumed_from"].endswith("checkpoint-4")
    assert not (ck / ".tmp-checkpoint-6").exists() and verify_manifest(ck / "checkpoint-6") is None


def test_final_save_lost_then_resumed_keeps_the_summary_figures(finished, tmp_path, tiny_model_dir):
    """The final model save failed after checkpoint-6 (model/ gone, no marker): the rerun resumes at step 6, trains
    nothing, saves model/ from the checkpoint and its summary still has the loss, margin and accuracy of step 6
    (from the checkpoint's train_state.json), equal to the uninterrupted run's."""
    import json

    from prefopt.stage import run_stage

    cfg, d = resumable_copy(finished, tmp_path, tiny_model_dir)
    shutil.rmtree(d / "model")
    summary = run_stage(cfg, "dpo")
    want = json.loads((finished[0] / "runs" / "t" / "dpo" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-6")
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert summary[key] == want[key]
    same_weights(finished[0] / "runs" / "t" / "dpo" / "model", d / "model")


def test_reference_cache_with_20_values_overwritten_is_recomputed(finished, tmp_path, tiny_model_dir, capsys):
    """20 of the cache's 32 values overwritten inside a file that still loads (shape, key and finiteness all
    fine): its content hash no longer matches, so the next run recomputes it with a line, the file holds the
    first run's values again, and step 1 (policy = reference) has the DPO loss log 2, not another number."""
    from prefopt.stage import run_stage
    from prefopt.runtime.tracking import read_metrics

    root, pairs = finished
    shutil.copytree(root / "runs", tmp_path / "runs")
    (cache,) = (tmp_path / "runs" / "t" / "cache" / "reference").glob("*.pt")
    data = torch.load(cache, weights_only=True)
    good = data["logps"].clone()
    assert good.numel() == 32
    data["logps"].view(-1)[:20] += 0.5
    torch.save(data, cache)  # the stored hash is the old one

    cfg = load(tmp_path, tiny_model_dir, pairs, beta=0.2)  # another fingerprint: a fresh run, the same reference
    summary = run_stage(cfg, "dpo")
    out = capsys.readouterr().out
    assert f"reference cache {cache} holds values that do not match its content hash" in out
    assert summary["reference_reused"] is False
    torch.testing.assert_close(torch.load(cache, weights_only=True)["logps"], good, rtol=0, atol=0)
    first = read_metrics(tmp_path / "runs" / "t" / "dpo")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_disk_full_while_saving_a_checkpoint_is_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """torch.save raising ENOSPC while the first checkpoint is written: exit code 6 and one line naming "No space
    left on device", the checkpoint folder and what to do; the traceback is in logs/dpo.log, not on the console;
    no checkpoint-2 (only its temporary folder) is left to be trusted."""
    from prefopt.cli import main

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=16)
    cfg = write_config(tmp_path, "dpo", {"model": str(tiny_model_dir), "pairs": str(pairs), **SECTION}, name="t")
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["dpo", str(cfg)]) == 6
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("prefopt:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    ckpts = tmp_path / "runs" / "t" / "dpo" / "checkpoints"
    assert lines[0].startswith(f"prefopt: resource error: No space left on device while writing {ckpts}/.tmp-"
                               "checkpoint-2")
    assert "free space on that disk or set output_dir to a larger one, then rerun the same command" in lines[0]
    log = tmp_path / "runs" / "t" / "logs" / "dpo.log"
    assert f"traceback in {log}" in lines[0]
    assert "Traceback" in log.read_text() and "OSError: [Errno 28]" in log.read_text()
    assert not (ckpts / "checkpoint-2").exists()


@pytest.mark.parametrize("error,words", [
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                  "[127.0.0.1]:28461"), "lost a peer process: rank 0 of 1 lost its connection"),
    (MemoryError(), "out of host memory (RAM)"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of GPU memory: lower "
                                                                               "per_device_train_batch_size"),
], ids=["lost_peer", "host_oom", "gpu_oom"])
def test_lost_peer_and_out_of_memory_are_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch, error, words):
    """A stage failing with gloo's error for a dead peer, MemoryError or torch's OutOfMemoryError: exit code 6,
    one line naming the cause and the rerun, the traceback in the stage's log file."""
    import prefopt.stage
    from prefopt.cli import main

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=4)
    cfg = write_config(tmp_path, "dpo", {"model": str(tiny_model_dir), "pairs": str(pairs), **SECTION}, name="t")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(prefopt.stage, "run_stage", fail)
    assert main(["dpo", str(cfg)]) == 6
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"prefopt: resource error: {words}") and "rerun the same command" in err
    assert type(error).__name__ in (tmp_path / "runs" / "t" / "logs" / "dpo.log").read_text()


def test_finished_input_damaged_in_place_is_named_before_use(tmp_path, tiny_model_dir, capsys):
    """sft's model.safetensors changed in place with its size and mtime kept (what the fast check compares):
    `prefopt dpo` hashes it against sft's marker before loading it and stops with one line naming the file and
    the stage to rerun (exit code 3)."""
    import yaml

    from prefopt.cli import main
    from prefopt.experiment import load_config
    from prefopt.stage import MARKER, completion_record, stage_status, write_json

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=4)
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"},
                                    "stages": ["sft", "dpo"], "sft": {"model": str(tiny_model_dir)},
                                    "dpo": {"model": "stage:sft", "pairs": str(pairs), **SECTION}}))
    cfg = load_config(str(path))
    sft = tmp_path / "runs" / "t" / "sft"
    shutil.copytree(tiny_model_dir, sft / "model")
    write_json(sft / MARKER, completion_record(cfg, "sft", 1, sft))
    weights = sft / "model" / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as f:  # 20 bytes near the end (tensor data) overwritten
        f.seek(st.st_size - 100)
        f.write(b"\x7f" * 20)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stage_status(cfg, "sft")[0]  # size and mtime unchanged: the fast check cannot see it

    assert main(["dpo", str(path)]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"prefopt: data error: {weights}: does not match the SHA-256 that {sft / MARKER} "
                          "recorded when sft finished") and "--from sft" in err, err
    assert not (tmp_path / "runs" / "t" / "dpo" / "checkpoints").exists()


def test_pairs_rewritten_while_dpo_runs_are_not_marked_done(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Experiment B trains dpo on experiment A's pairs folder; A rebuilds it (16 -> 10 pairs, written by rename as
    the pairs stage writes) right after B has loaded the pairs. B refuses to mark itself done: exit code 3 and one
    line naming the file; no marker. The rerun starts over (nothing resumed from the steps on the old pairs) and
    finishes; in every finished run the summary's pair count is that of the file whose hash the marker records."""
    import json

    import prefopt.preference.loop as loop
    from prefopt.cli import main
    from prefopt.experiment import load_config
    from prefopt.stage import MARKER, sha256_file, stage_status

    a_pairs = tmp_path / "a" / "runs" / "a" / "pairs"
    a_pairs.mkdir(parents=True)
    pairs = write_pairs(a_pairs / "pairs.jsonl", n=16)
    (tmp_path / "b").mkdir()
    cfg_path = write_config(tmp_path / "b", "dpo", {"model": str(tiny_model_dir), "pairs": str(a_pairs),
                                                    **SECTION, "max_steps": 4}, name="b")
    d = tmp_path / "b" / "runs" / "b" / "dpo"
    tokenize = loop.tokenize_pairs

    def rebuilt_by_a(rows, *args, **kwargs):  # the pairs are read: A's pairs stage now replaces the file
        out = tokenize(rows, *args, **kwargs)
        write_pairs(a_pairs / ".pairs.jsonl.tmp", n=10, seed=1)
        os.replace(a_pairs / ".pairs.jsonl.tmp", pairs)
        return out

    monkeypatch.setattr(loop, "tokenize_pairs", rebuilt_by_a)
    assert main(["dpo", str(cfg_path)]) == 3
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("prefopt:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"prefopt: data error: {pairs}: changed while dpo ran") and "not marked done" in lines[0]
    assert not (d / MARKER).exists()
    assert stage_status(load_config(str(cfg_path)), "dpo") == (False, "not finished")

    monkeypatch.undo()
    assert main(["dpo", str(cfg_path)]) == 0
    summary = json.loads((d / "summary.json").read_text())
    marker = json.loads((d / MARKER).read_text())
    assert summary["resumed_from"] is None and summary["steps"] == 4  # started over
    assert summary["pairs"] == 10 == len(pairs.read_text().splitlines())
    assert marker["files_in"][str(pairs.resolve())][2] == sha256_file(pairs)
    assert stage_status(load_config(str(cfg_path)), "dpo")[0]
