"""The DPO reference pass on every process: each process computes its share of the batches through the prepared
model (DDP, FSDP2), the shares are gathered and the main process writes the cache, which equals the one the same
pairs give on one process. Batch i goes to process i % world, so each batch has the one-process composition; a
process whose share ran out runs a dummy batch (every forward is collective). A resumed run whose cache is gone
recomputes it from the starting weights, not the checkpoint's."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from pair_helpers import REPO, write_pairs
from test_ppo_distributed import launch_env, launcher

# 9 pairs in batches of 2: 5 batches, the last of 1 pair; on 2 processes process 0 takes batches 0, 2, 4 and
# process 1 takes 1, 3 and then runs a dummy batch.
N_PAIRS, BATCH = 9, 2
# Two processes against one: the same batches through the same weights. FSDP2 projects to the vocabulary inside the
# sharded forward (logits_to_keep) where one process projects hooked hidden states, which may round differently;
# measured on CPU: 0 for DDP and FSDP2 alike (bit-identical; DDP is asserted so).
CACHE_ATOL = 1e-6


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", n=N_PAIRS)


def dpo_experiment(root: Path, name: str, model, pairs: Path, **extra) -> Path:
    section = {"model": str(model), "pairs": str(pairs), "max_steps": 1, "per_device_train_batch_size": BATCH,
               "logging_steps": 1, "save_steps": 100, "max_length": 256, **extra}
    cfg = {"name": name, "output_dir": str(root / "runs"), "wandb": {"mode": "disabled"}, "stages": ["dpo"],
           "dpo": section}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dpo(exp: Path, processes: int, fsdp: bool = False) -> dict:
    """`prefopt dpo EXP` on one process, or under `accelerate launch` on two CPU processes (DDP, or FSDP2 through
    tests/fsdp_on_cpu); returns the stage summary."""
    cmd = (launcher(2, fsdp) + ["-m"] if processes == 2 else [sys.executable, "-m"]) + ["prefopt", "dpo", str(exp)]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(fsdp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    name = yaml.safe_load(exp.read_text())["name"]
    return json.loads((exp.parent / "runs" / name / "dpo" / "summary.json").read_text())


def cached(summary: dict) -> dict:
    return torch.load(summary["reference_cache"], map_location="cpu", weights_only=True)


def step1_loss(summary: dict) -> float:
    from prefopt.runtime.tracking import read_metrics

    return read_metrics(Path(summary["model"]).parent)[0]["loss"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, other_model_dir, pairs) -> dict[str, dict]:
    """The one-process caches: reference = the policy's start, and reference = another model."""
    root = tmp_path_factory.mktemp("one")
    return {"policy": run_dpo(dpo_experiment(root, "policy", tiny_model_dir, pairs), 1),
            "ref_model": run_dpo(dpo_experiment(root, "ref", tiny_model_dir, pairs,
                                                ref_model=str(other_model_dir)), 1)}


@pytest.mark.slow
@pytest.mark.parametrize("backend, reference", [("ddp", "policy"), ("fsdp2", "policy"), ("fsdp2", "ref_model")])
def test_two_processes_write_the_one_process_cache(tmp_path, tiny_model_dir, other_model_dir, pairs, one_process,
                                                   backend, reference):
    """The cache two processes write (each its share through the prepared model: the DDP-wrapped or FSDP2-sharded
    policy, or a `ref_model` sharded like it) equals the one-process cache: same key, same file name, log-probs
    within 1e-6 (measured: 0 in all three cases; the log-probs are about -45)."""
    extra = {"ref_model": str(other_model_dir)} if reference == "ref_model" else {}
    two = run_dpo(dpo_experiment(tmp_path, "two", tiny_model_dir, pairs, **extra), 2, fsdp=backend == "fsdp2")
    one = one_process[reference]
    if backend == "fsdp2":  # the policy really was sharded: each process wrote its own shard of the final state
        state = Path(two["model"]).parent / "checkpoints" / "checkpoint-1" / "state" / "pytorch_model_fsdp_0"
        assert sorted(p.name for p in state.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert two["reference_reused"] is False and one["reference_reused"] is False
    assert Path(two["reference_cache"]).name == Path(one["reference_cache"]).name  # same key, same file name
    a, b = cached(two), cached(one)
    assert a["key"] == b["key"]
    assert a["logps"].shape == (N_PAIRS, 2) and torch.isfinite(a["logps"]).all()
    diff = (a["logps"] - b["logps"]).abs().max().item()
    print(f"\n{backend} {reference}: max |2 processes - 1 process| = {diff:.3g}")
    assert diff <= CACHE_ATOL
    if backend == "ddp":
        assert torch.equal(a["logps"], b["logps"])
    if reference == "policy":
        # policy = reference at step 1: DPO's loss is log 2 on both processes' pairs only if each process's rows of
        # the gathered cache are its own pairs' (the pairs' log-probs differ by far more than this tolerance)
        assert step1_loss(two) == pytest.approx(math.log(2), abs=1e-5)
        spread = (b["logps"] - b["logps"].mean(0)).abs().max().item()
        assert spread > 0.1
    else:
        assert (cached(one_process["policy"])["logps"] - b["logps"]).abs().max().item() > 0.1  # another model


class ThreadedProcesses:
    """`world` stand-in accelerator processes in threads of this one: `gather` concatenates every process's tensor
    in rank order, as accelerate's does (a barrier, then the concatenation)."""

    def __init__(self, world: int):
        self.world, self.parts, self.barrier = world, [None] * world, threading.Barrier(world)

    def rank(self, r: int):
        group = self

        class Accel:
            num_processes, process_index, device = group.world, r, torch.device("cpu")

            def gather(self, t):
                group.parts[r] = t
                group.barrier.wait()
                out = torch.cat(group.parts)
                group.barrier.wait()
                return out

        return Accel()


@pytest.mark.parametrize("world", [2, 3])
def test_batches_go_to_processes_in_turn_and_the_last_share_is_padded(tiny_model_dir, pairs, world):
    """refcache.compute on `world` stand-in processes (threads, each with its own copy of the model): every process
    runs ceil(5 / world) forward passes (the padded last share included), each pass sees a one-process batch, and
    the gathered tensor equals the one-process result bit for bit."""
    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.preference import reference as refcache
    from prefopt.preference.data import load_pairs, tokenize_pairs

    tok = load_tokenizer(str(tiny_model_dir))
    examples = tokenize_pairs(load_pairs(str(pairs), "alpaca", tok), tok, 256)
    model = load_causal_lm(str(tiny_model_dir), "float32")
    args = (examples, tok.pad_token_id, 256, BATCH, "shared_prompt", 0)
    expected = refcache.compute(model, *args)
    assert expected.shape == (N_PAIRS, 2)

    group = ThreadedProcesses(world)
    seen: list[list[int]] = [[] for _ in range(world)]  # each process's forward passes: the batch's sequence count
    results: list = [None] * world

    def process(r: int):
        replica = copy.deepcopy(model)  # one model per thread: pair_logps hooks the decoder of the model it runs
        replica.register_forward_pre_hook(lambda _m, _a, kw: seen[r].append(int(kw["input_ids"].shape[0])),
                                          with_kwargs=True)
        results[r] = refcache.compute(replica, *args, accelerator=group.rank(r))

    threads = [threading.Thread(target=process, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    rounds = math.ceil(math.ceil(N_PAIRS / BATCH) / world)
    assert [len(s) for s in seen] == [rounds] * world  # the same number of forwards on every process
    for r in range(world):
        assert torch.equal(results[r], expected), r  # every process holds the whole result, in order


def test_resume_without_the_cache_recomputes_it_from_the_starting_weights(tmp_path, tiny_model_dir, pairs,
                                                                         monkeypatch):
    """A run killed after its step-2 checkpoint, its reference cache deleted, started again: it resumes from
    checkpoint-2 and recomputes the cache from the policy's starting weights (the pass runs before the checkpoint is
    loaded), bit-identical to the first run's, not from the checkpoint's weights (which give log-probs 1e-1 away)."""
    from prefopt.experiment import load_config
    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.preference import loop
    from prefopt.preference import reference as refcache
    from prefopt.preference.data import load_pairs, tokenize_pairs
    from prefopt.stage import run_stage

    cfg = load_config(str(dpo_experiment(tmp_path, "killed", tiny_model_dir, pairs, max_steps=4, save_steps=2,
                                         learning_rate=5e-3, lr_scheduler_type="constant")))
    save = loop.save_checkpoint

    def save_then_die(accelerator, model, tokenizer, ckpt_dir, step, *args):
        save(accelerator, model, tokenizer, ckpt_dir, step, *args)
        if step == 2:
            raise KeyboardInterrupt("killed after checkpoint 2")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "dpo")
    monkeypatch.setattr(loop, "save_checkpoint", save)
    info = json.loads((tmp_path / "runs" / "killed" / "dpo" / "reference.json").read_text())
    first = torch.load(info["file"], weights_only=True)["logps"]
    Path(info["file"]).unlink()

    summary = run_stage(cfg, "dpo")
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4
    assert summary["reference_reused"] is False and summary["reference_cache"] == info["file"]
    assert torch.equal(torch.load(info["file"], weights_only=True)["logps"], first)

    ckpt = tmp_path / "runs" / "killed" / "dpo" / "checkpoints" / "checkpoint-2"
    tok = load_tokenizer(str(tiny_model_dir))
    examples = tokenize_pairs(load_pairs(str(pairs), "alpaca", tok), tok, 256)
    trained = refcache.compute(load_causal_lm(str(ckpt), "float32"), examples, tok.pad_token_id, 256, BATCH,
                               "shared_prompt")
    assert (trained - first).abs().max().item() > 0.1  # the checkpoint's weights would have given other numbers



def test_a_lora_policys_reference_is_its_base(tmp_path, tiny_model_dir, pairs):
    """With LoRA the pass runs on the prepared PEFT model (adapter switched off; a fresh adapter adds exactly zero
    anyway): the same cache as without LoRA, bit for bit, and step 1 is at log 2."""
    from prefopt.experiment import load_config
    from prefopt.stage import run_stage

    runs = {}
    for name, extra in (("plain", {}), ("lora", {"lora": {"enabled": True, "r": 4, "alpha": 8}})):
        cfg = load_config(str(dpo_experiment(tmp_path, name, tiny_model_dir, pairs, **extra)))
        runs[name] = run_stage(cfg, "dpo")
    assert runs["lora"]["reference_cache"] != runs["plain"]["reference_cache"]  # two experiments, two files
    assert torch.equal(cached(runs["lora"])["logps"], cached(runs["plain"])["logps"])
    assert step1_loss(runs["lora"]) == pytest.approx(math.log(2), abs=1e-6)
