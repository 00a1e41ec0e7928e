"""The `simpo` stage run as a user runs it, its resume after a kill, and under `accelerate launch` (2 CPU procs)."""

from __future__ import annotations

import json

import pytest
import torch

from pair_helpers import PY, pair_logps, run_prefopt, state_dict, write_config, write_pairs
from prefopt.simpo.loss import simpo_loss
from prefopt.runtime.tracking import read_metrics

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "length/chosen"]


def section(model, pairs, **kw):
    return {"model": str(model), "pairs": str(pairs), "per_device_train_batch_size": 4, "learning_rate": 5e-3,
            "lr_scheduler_type": "cosine", "max_steps": 4, "logging_steps": 1, "save_steps": 2,
            "max_length": 256, **kw}


def simpo_on(model_dir, pairs, beta=2.0, ratio=0.5):
    c, r, lc, lr = pair_logps(model_dir, pairs)
    return simpo_loss(c, r, lc, lr, beta, ratio)


def test_simpo_smoke_and_resume(tmp_path, tiny_model_dir, monkeypatch):
    """4 steps: the saved policy has a lower SimPO loss and a larger margin on the training pairs than its start.
    Every save leaves a loadable HF model in checkpoints/checkpoint-<step>/ (training state in the newest two).
    Then a kill after the step-2 checkpoint is simulated (checkpoint-4, model and completion marker removed)
    and the same command resumes from step 2: its final weights equal the uninterrupted run's."""
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    cfg = write_config(tmp_path, "simpo", section(tiny_model_dir, pairs))
    run_prefopt("simpo", str(cfg))
    out = tmp_path / "runs" / "t" / "simpo"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(k in rows[0] for k in METRICS)
    before, m0 = simpo_on(tiny_model_dir, pairs)
    after, m1 = simpo_on(out / "model", pairs)
    assert after.item() < before.item() - 0.05
    assert m1["rewards/margins"].item() > m0["rewards/margins"].item() + 0.1

    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # the newest two keep their training state: a damaged newest one has a fallback (tests/test_checkpoint_integrity)
    assert (ckpts / "checkpoint-2" / "state").is_dir() and (ckpts / "checkpoint-4" / "state").is_dir()
    uninterrupted = state_dict(out / "model")
    for k, v in state_dict(ckpts / "checkpoint-4").items():  # the last checkpoint is the final policy
        torch.testing.assert_close(v, uninterrupted[k])

    # the same run killed right after its step-2 checkpoint, then started again: it resumes at step 2
    from prefopt.experiment import load_config
    from prefopt.preference import loop
    from prefopt.stage import run_stage

    cfg2 = load_config(str(write_config(tmp_path, "simpo", section(tiny_model_dir, pairs), name="killed")))
    save = loop.save_checkpoint

    def save_then_die(accelerator, model, tokenizer, ckpt_dir, step, *args):
        save(accelerator, model, tokenizer, ckpt_dir, step, *args)
        if step == 2:
            raise KeyboardInterrupt("killed after checkpoint 2")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg2, "simpo")
    monkeypatch.setattr(loop, "save_checkpoint", save)
    summary = run_stage(cfg2, "simpo")
    killed = tmp_path / "runs" / "killed" / "simpo"
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4
    assert [r["step"] for r in read_metrics(killed)] == [1, 2, 3, 4]
    resumed = state_dict(killed / "model")
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_simpo_ddp_two_processes(tmp_path, tiny_model_dir):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): logs once per step (main process only), saves,
    and matches a single-process run with the same global batch."""
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    cfg = write_config(tmp_path, "simpo", section(tiny_model_dir, pairs, per_device_train_batch_size=2,
                                                   max_steps=3, save_steps=100))
    launcher = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    run_prefopt("simpo", str(cfg), launcher=launcher)
    out = tmp_path / "runs" / "t" / "simpo"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    # each row's throughput: both processes' counts (a collective every process reaches, or this run would hang)
    assert all(r["perf/tokens_per_s"] > 0 and 0 < r["perf/mfu"] < r["perf/mfu_with_attention"] for r in rows)
    assert (out / "model" / "model.safetensors").exists()
    # 2 processes x 2 pairs see the same 4 pairs per step as 1 process x 4 (consecutive slices of one permutation);
    # DDP averages the two halves' gradients, so the weights match a single-process run with batch 4.
    single = write_config(tmp_path, "simpo", section(tiny_model_dir, pairs, max_steps=3, save_steps=100), "single")
    run_prefopt("simpo", str(single))
    ddp, one = state_dict(out / "model"), state_dict(tmp_path / "runs" / "single" / "simpo" / "model")
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=2e-4, rtol=1e-3)  # Adam amplifies reduction-order noise


@pytest.mark.slow
# Gemma-2 only: the Llama under FSDP2 trains in tests/test_fsdp_trainers.py (sft, reward) and test_ppo_distributed.py,
# and computes the shared-prompt reference in test_reference_distributed.py; SimPO adds its objective, which is
# the same on both families (a Llama run here took 12.6 s of `make test`)
@pytest.mark.parametrize("family", ["gemma2"])
def test_simpo_fsdp2_two_processes(tmp_path, tiny_model_dir, family):
    """The same two-process run under FSDP2 (accelerate's own FSDP2 on CPU processes, through tests/fsdp_on_cpu):
    the weights are sharded, checkpoints are written shard by shard, and the saved policy matches the
    one-process run with the same global batch. On Gemma-2 (eager attention, soft-capping inside the sharded
    forward, sliding window, tied embeddings: tests/families.py), wrapped by its own decoder layer class."""
    import os

    from families import FAMILIES, save_family
    from test_ppo_distributed import FSDP_ON_CPU, launcher

    if family != "llama":
        tiny_model_dir = save_family(FAMILIES[family], tmp_path / family, hidden_size=32)

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    cfg = write_config(tmp_path, "simpo", section(tiny_model_dir, pairs, per_device_train_batch_size=2,
                                                   max_steps=3, save_steps=2))
    env = {"PYTHONPATH": os.pathsep.join([str(FSDP_ON_CPU), os.environ.get("PYTHONPATH", "")])}
    run_prefopt("simpo", str(cfg), launcher=launcher(2, fsdp=True) + ["-m"], env=env)
    out = tmp_path / "runs" / "t" / "simpo"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    states = sorted((out / "checkpoints").glob("checkpoint-*/state/pytorch_model_fsdp_0"))  # the newest two keep it
    assert len(states) == 2
    for state in states:
        assert sorted(p.name for p in state.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # sharded
    single = write_config(tmp_path, "simpo", section(tiny_model_dir, pairs, max_steps=3, save_steps=100), "single")
    run_prefopt("simpo", str(single))
    fsdp, one = state_dict(out / "model"), state_dict(tmp_path / "runs" / "single" / "simpo" / "model")
    assert fsdp.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(fsdp[k], one[k], atol=2e-4, rtol=1e-3)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tiny_model_dir):
    """2 optimizer steps of batch 2 x 2 accumulated micro-batches and of batch 4 x 1 see the same 4 pairs per step
    (consecutive slices of one permutation); SimPO without its NLL term is a mean over pairs and accelerate divides
    each micro-batch's loss by the accumulation count, so the summed gradients, the logged losses and the final
    weights are the large batch's (1e-5). Constant lr, no clipping: Adam's steps are then ~lr per weight, and the
    weights move by far more than the tolerance."""
    from prefopt.experiment import load_config
    from prefopt.stage import run_stage

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    common = dict(max_steps=2, save_steps=100, lr_scheduler_type="constant", max_grad_norm=0.0, learning_rate=1e-3)
    runs = {"accum": section(tiny_model_dir, pairs, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             **common),
            "batch4": section(tiny_model_dir, pairs, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                              **common)}
    weights, losses = {}, {}
    for name, sec in runs.items():
        summary = run_stage(load_config(str(write_config(tmp_path, "simpo", sec, name=name))), "simpo")
        assert summary["steps"] == 2
        out = tmp_path / "runs" / name / "simpo"
        losses[name] = [r["loss"] for r in read_metrics(out)]
        weights[name] = state_dict(out / "model")
    assert len(losses["accum"]) == 2
    assert losses["accum"] == pytest.approx(losses["batch4"], abs=1e-5)
    start = state_dict(tiny_model_dir)
    moved = max((weights["batch4"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # two Adam steps of lr 1e-3: 100x the tolerance below
    for k, w in weights["batch4"].items():
        torch.testing.assert_close(weights["accum"][k], w, atol=1e-5, rtol=0)


def test_orpo_stage_smoke(tmp_path, tiny_model_dir):
    """`simpo.loss_type: orpo`, launched as a user does, 3 steps: finishes, logs a finite loss every step with the
    shared metric names and ORPO's log-odds; step 1 (one batch of all 8 pairs, weights untouched) is orpo_loss on
    the tiny model's log-probs (1e-5), and the saved policy's ORPO loss on the pairs is below its start."""
    from prefopt.simpo.loss import orpo_loss

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    cfg = write_config(tmp_path, "simpo", section(tiny_model_dir, pairs, loss_type="orpo", beta=0.1,
                                                   per_device_train_batch_size=8, max_steps=3, save_steps=100,
                                                   lr_scheduler_type="constant", learning_rate=5e-3))
    run_prefopt("simpo", str(cfg))
    out = tmp_path / "runs" / "t" / "simpo"
    assert (out / "model" / "model.safetensors").exists() and (out / "_DONE.json").exists()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(k in rows[0] for k in METRICS + ["log_odds_ratio"])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    c, r, lc, lr = pair_logps(tiny_model_dir, pairs)
    before, _ = orpo_loss(c, r, lc, lr, beta=0.1)
    assert rows[0]["loss"] == pytest.approx(before.item(), abs=1e-5)
    after, _ = orpo_loss(*pair_logps(out / "model", pairs), beta=0.1)
    assert after.item() < before.item() - 0.05
