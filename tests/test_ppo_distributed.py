"""PPO over several processes: two CPU processes (DDP over gloo) give the run one process gives with the same
global rollout and minibatch sizes, a two-process run killed mid-iteration resumes exactly, and launches PPO
cannot use are refused before any weights load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# Tolerances of the 2-process run against the 1-process run. The samples are the same (generation_chunk 4: each
# chunk of 4 prompts is seeded by its index in the global rollout); what differs is float summation order (DDP's
# all-reduce adds two half-minibatch gradients; forward passes run on batches of other shapes). Measured: weights
# within 2.2e-7 after 5 iterations (they move by 1.8e-2), metrics within 1.3e-4 relative (loss/policy, a mean of
# terms that nearly cancel), rewards, lengths and the KL coefficient identical.
METRIC_RTOL, METRIC_ATOL = 1e-3, 1e-5
WEIGHT_ATOL = 1e-5
# Shares of tokens on either side of a comparison. In the first minibatch the value model's outputs equal the
# rollout's, so every token is a tie between the clipped and unclipped value error, which float noise breaks
# either way (measured in a smaller configuration: 0.500 vs 0.510, one token in 96).
TIE_METRICS, TIE_ATOL = {"clipfrac", "value/clipfrac"}, 0.05


def ppo_experiment(root: Path, tiny_model_dir, prompts_file: Path, **ppo) -> Path:
    section = {"policy": str(tiny_model_dir), "reward_fn": "plugins.ppo_rewards:digit_share",
               "prompts": {"path": str(prompts_file)}, "total_episodes": 60, "rollout_batch_size": 12,
               "mini_batch_size": 8, "generation_chunk": 3, "ppo_epochs": 2, "max_new_tokens": 6,
               "learning_rate": 1e-3, "value_learning_rate": 1e-3, "kl_target": 1.0, "kl_horizon": 100,
               "save_every": 1, **ppo}
    cfg = {"name": "p", "output_dir": str(root / "runs"), "wandb": {"mode": "disabled"}, "stages": ["ppo"],
           "ppo": section}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(exp: Path, processes: int, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        cmd.append("--multi_gpu")
    cmd += ["-m", "prefopt", "ppo", str(exp)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "true",
                "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


def metrics(stage_dir: Path) -> dict[int, dict]:
    from prefopt.tracking import read_metrics

    return {r["step"]: {k: v for k, v in r.items() if k != "time"} for r in read_metrics(stage_dir)}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"instruction": "Sort the numbers in ascending order.",
             "input": " ".join(str((i * 7 + j * 3) % 10) for j in range(3 + i % 3))} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_kill(tmp_path, tiny_model_dir, prompts_file):
    """5 iterations of 12 episodes on one process, and on two processes killed by SIGKILL in the middle of
    iteration 4 (rank 1, while scoring) then rerun: the resumed two-process run logs every iteration once and ends
    with the one-process run's metrics and weights, within the tolerances above. Minibatches of 8 leave a last one
    of 4 in each epoch (split 2 + 2), and each process samples its 6 prompts in two chunks of 3."""
    from safetensors.torch import load_file

    one = ppo_experiment(tmp_path / "one", tiny_model_dir, prompts_file)
    out = launch(one, 1)
    assert out.returncode == 0, out.stderr[-3000:]

    two = ppo_experiment(tmp_path / "two", tiny_model_dir, prompts_file)
    marker = tmp_path / "killed"
    # Each process scores 6 responses per iteration: the 19th call is the first of iteration 4.
    out = launch(two, 2, PPO_DIE_AFTER_CALLS="18", PPO_DIE_MARKER=str(marker))
    d = tmp_path / "two" / "runs" / "p" / "ppo"
    assert out.returncode != 0 and marker.exists()
    assert not (d / "_DONE.json").exists() and not (d / "model").exists()
    assert sorted(p.name for p in (d / "checkpoints").glob("iter-*")) == ["iter-2", "iter-3"]
    out = launch(two, 2, PPO_DIE_AFTER_CALLS="18", PPO_DIE_MARKER=str(marker))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stdout + out.stderr and "iteration 3 of 5" in out.stdout + out.stderr

    summary = json.loads((d / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["iterations"] == 5 and summary["episodes"] == 60
    from prefopt.tracking import read_metrics

    assert [r["step"] for r in read_metrics(d)] == [1, 2, 3, 4, 5]  # resumed, not restarted
    a, b = metrics(tmp_path / "one" / "runs" / "p" / "ppo"), metrics(d)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert a[step].keys() == b[step].keys()
        for k in a[step]:
            tol = {"abs": TIE_ATOL} if k in TIE_METRICS else {"rel": METRIC_RTOL, "abs": METRIC_ATOL}
            assert b[step][k] == pytest.approx(a[step][k], **tol), (step, k)
    assert a[5]["kl_coef"] != a[1]["kl_coef"]  # the adaptive controller moved and resumed with its state
    assert a[5]["reward"] != a[1]["reward"]
    wa = load_file(tmp_path / "one" / "runs" / "p" / "ppo" / "model" / "model.safetensors")
    wb = load_file(d / "model" / "model.safetensors")
    init = load_file(Path(tiny_model_dir) / "model.safetensors")
    moved = max((wa[k] - init[k]).abs().max().item() for k in wa)
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert moved > 100 * WEIGHT_ATOL and diff < WEIGHT_ATOL, (moved, diff)  # it trained, and the same way


def test_launches_ppo_cannot_use_are_refused(tmp_path):
    """Batch sizes that do not split over the processes, and a sharded accelerate config, from `prefopt check`
    (naming the keys) and from the stage itself."""
    from prefopt.checks import problems_and_warnings
    from prefopt.config import ConfigError, from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.recipe import check_world

    cfg = from_dict(ExperimentConfig, {
        "name": "x", "stages": ["ppo"], "launch": {"num_processes": 3},
        "ppo": {"policy": "m", "reward_fn": "task:gold", "rollout_batch_size": 16, "mini_batch_size": 8}})
    problems, _ = problems_and_warnings(cfg)
    assert any(p.startswith("ppo.rollout_batch_size (16) must be a multiple of the number of processes (3, "
                            "launch.num_processes or the accelerate config's)") for p in problems), problems
    assert any(p.startswith("ppo.mini_batch_size (8) must be a multiple") for p in problems), problems
    with pytest.raises(ConfigError, match=r"ppo.rollout_batch_size \(16\) must be a multiple of the number of "):
        check_world(PPOConfig(rollout_batch_size=16, mini_batch_size=8), 3)
    with pytest.raises(ConfigError, match=r"ppo.generation_chunk \(3\) must divide each process's share"):
        check_world(PPOConfig(rollout_batch_size=16, mini_batch_size=8, generation_chunk=3), 2)
    check_world(PPOConfig(rollout_batch_size=16, mini_batch_size=8, generation_chunk=4), 2)

    cfg = from_dict(ExperimentConfig, {
        "name": "x", "stages": ["ppo"],
        "launch": {"num_processes": 2, "accelerate_config": str(REPO / "experiments/accelerate/deepspeed_zero3.yaml")},
        "ppo": {"policy": "m", "reward_fn": "task:gold", "rollout_batch_size": 16, "mini_batch_size": 8}})
    problems, _ = problems_and_warnings(cfg)
    assert any("is DEEPSPEED; the ppo stage runs under DDP" in p for p in problems), problems

    # launch.num_processes 1 with a config file: the file's count is what runs (8 in ddp.yaml), and what is checked
    cfg = from_dict(ExperimentConfig, {
        "name": "x", "stages": ["ppo"], "launch": {"accelerate_config": str(REPO / "experiments/accelerate/ddp.yaml")},
        "ppo": {"policy": "m", "reward_fn": "task:gold", "rollout_batch_size": 12, "mini_batch_size": 4}})
    problems, _ = problems_and_warnings(cfg)
    assert any(p.startswith("ppo.rollout_batch_size (12) must be a multiple of the number of processes (8") for p in
               problems), problems


def test_the_whitening_and_the_loss_weights_are_those_of_the_global_batch():
    """The pieces that make N processes equal one, on numbers: each process's share of a minibatch's token mean
    (n_local / N_global * processes; exactly 1 on one process), and a rollout whose per-row tensors are gathered
    gets the advantages one process computes on all rows."""
    from types import SimpleNamespace

    from prefopt.ppo.recipe import global_token_weight
    from prefopt.ppo.rollout import score_rollout

    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.float32)
    rows = torch.tensor([0, 1, 2, 3])
    assert global_token_weight(mask, rows[:2], rows, 2).item() == pytest.approx(3 / 8 * 2)
    assert global_token_weight(mask, rows[2:], rows, 2).item() == pytest.approx(5 / 8 * 2)
    assert global_token_weight(mask, rows, rows, 1).item() == 1.0
    # The two weighted half-means average (as DDP does) to the token mean over all 8 tokens.
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    halves = [(x[i] * mask[i]).sum() / mask[i].sum() * global_token_weight(mask, i, rows, 2)
              for i in (rows[:2], rows[2:])]
    assert (sum(halves) / 2).item() == pytest.approx(((x * mask).sum() / mask.sum()).item())

    g = torch.Generator().manual_seed(0)
    t = {"input_ids": torch.zeros(4, 4, dtype=torch.long), "attention_mask": torch.ones(4, 4), "mask": mask,
         "logps": -torch.rand(4, 3, generator=g), "ref_logps": -torch.rand(4, 3, generator=g),
         "values": torch.randn(4, 3, generator=g) * mask, "entropy": torch.rand(4, 3, generator=g),
         "scores": torch.tensor([1.0, 0.0, 0.5, 2.0]), "finished": torch.tensor([1.0, 1.0, 0.0, 1.0])}
    cfg = SimpleNamespace(missing_eos_penalty=1.0, whiten_rewards=False, gamma=1.0, lam=0.95)
    ro = score_rollout(t, 0.1, cfg)
    adv = ro.advantages[mask.bool()]
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-6)  # whitened over all rows' tokens together
    assert adv.std().item() == pytest.approx(1.0, abs=1e-4)
    part = score_rollout({k: v[:2] for k, v in t.items()}, 0.1, cfg)  # one process alone would see these
    assert not torch.allclose(part.advantages[:2], ro.advantages[:2])


def test_vllm_backend_is_given_the_policy_before_every_rollout(tiny_model_dir, tmp_path, monkeypatch):
    """`ppo.backend: vllm`: the stage builds a vLLM engine from the policy checkpoint (stand-in `vllm` module, as
    tests/test_vllm_colocate.py; vLLM needs CUDA) and, before each iteration's rollout, hands it the policy's
    current weights and resets its prefix cache: iteration 1 samples from the SFT weights, iteration 2 from the
    weights after one PPO update."""
    from types import SimpleNamespace

    from test_vllm_colocate import _stand_in_vllm

    from prefopt.models import load_causal_lm, load_reward_model, load_tokenizer
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.recipe import make_accelerator, rollout_generator, train
    from prefopt.ppo.rollout import ValueModel
    from prefopt.utils import seed_everything

    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _stand_in_vllm(calls))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # the stage sets what is missing
        monkeypatch.setenv(k, "")  # recorded, so teardown restores this process's environment (later tests
        monkeypatch.delenv(k)  # launch process groups of their own and must not inherit a MASTER_PORT)
    seed_everything(0)
    tok = load_tokenizer(str(tiny_model_dir))
    policy, ref = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir))
    value = ValueModel(load_reward_model(str(tiny_model_dir)))
    cfg = PPOConfig(policy=str(tiny_model_dir), backend="vllm", vllm_sleep=True, generation_chunk=2,
                    total_episodes=8, rollout_batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4,
                    learning_rate=1e-2, save_every=100)
    ctx = SimpleNamespace(resolve=lambda value, model=True: value, seed=0)
    accelerator = make_accelerator()
    prompts = [f"Sort: {i} 3 1" for i in range(8)]
    gen = rollout_generator(ctx, cfg, policy, tok, accelerator, prompts)
    assert calls["llm"]["model"] == str(tiny_model_dir) and calls["llm"]["dtype"] == "float32"
    # One process too: with its own executor vLLM would keep the model in a subprocess load_weights cannot reach.
    assert calls["llm"]["distributed_executor_backend"] == "external_launcher"
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"].isdigit()
    assert calls["llm"]["max_model_len"] == max(len(tok(p)["input_ids"]) for p in prompts) + cfg.max_new_tokens

    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    rows = []
    train(policy, ref, value, tok, prompts,
          lambda prompts, comps: torch.tensor([float(len(c.token_ids)) for c in comps]), gen, cfg, seed=0,
          ckpt_dir=tmp_path / "ckpt", tracker=SimpleNamespace(log=lambda m, step=None: rows.append(m)),
          accelerator=accelerator)
    assert len(rows) == 2
    # Each rollout: weights woken and pushed, cache reset, KV cache woken, two chunks sampled, asleep for the update.
    assert calls["events"] == ["sleep(2)"] + ["wake_up(weights)", "load_weights", "reset_prefix_cache",
                                             "wake_up(kv_cache)", "generate", "generate", "sleep(2)"] * 2
    first, second = (dict(load) for load in calls["loads"])
    assert first.keys() == {n for n, _ in policy.named_parameters()}  # every parameter (a tied one once)
    for name, t in first.items():
        torch.testing.assert_close(t, initial[name], rtol=0, atol=0)  # the SFT weights
    assert any(not torch.equal(second[n], first[n]) for n in first)  # after one update: the new policy


def test_colocated_vllm_on_each_process(tiny_model_dir, monkeypatch):
    """Under several processes each one builds its own engine (vLLM's external_launcher: the engine joins this
    process's rank instead of starting workers), and `ppo.vllm_sleep` frees its memory between rollouts."""
    from types import SimpleNamespace

    from test_vllm_colocate import _stand_in_vllm

    from prefopt.models import load_tokenizer
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.recipe import rollout_generator

    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _stand_in_vllm(calls))
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    cfg = PPOConfig(policy=str(tiny_model_dir), backend="vllm", vllm_sleep=True, vllm_gpu_memory_utilization=0.25,
                    total_episodes=8, rollout_batch_size=4, mini_batch_size=2)
    ctx = SimpleNamespace(resolve=lambda value, model=True: value, seed=3)
    gen = rollout_generator(ctx, cfg, None, load_tokenizer(str(tiny_model_dir)), SimpleNamespace(num_processes=2),
                            ["Sort: 3 1 2"])
    assert calls["llm"]["distributed_executor_backend"] == "external_launcher"
    assert calls["llm"]["gpu_memory_utilization"] == 0.25 and calls["llm"]["enable_sleep_mode"] is True
    assert gen.seed == 3 + 1  # the rank's own engine seed
    assert calls["events"] == ["sleep(2)"]  # asleep until the first load_weights


def test_resuming_with_another_number_of_processes_is_refused(tmp_path, tiny_model_dir):
    """A checkpoint holds DDP-prefixed state dicts and one RNG file per process: a run on another number of
    processes gets a one-line error naming launch.num_processes, not a wall of missing keys."""
    from types import SimpleNamespace

    from prefopt.config import ConfigError
    from prefopt.models import load_causal_lm, load_reward_model
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.recipe import TRAINER_STATE, latest_checkpoint, train
    from prefopt.ppo.rollout import ValueModel

    ckpt = tmp_path / "ckpt" / "iter-2"
    ckpt.mkdir(parents=True)
    torch.save({"iteration": 2, "num_processes": 2}, ckpt / TRAINER_STATE)
    (tmp_path / "ckpt" / "iter-best").mkdir()  # not a checkpoint: neither resumed from nor in the way
    assert latest_checkpoint(tmp_path / "ckpt") == ckpt
    cfg = PPOConfig(total_episodes=8, rollout_batch_size=4, mini_batch_size=2)
    policy = load_causal_lm(str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"was written by 2 processes but this run has 1: resume with "
                                          r"launch.num_processes 2"):
        train(policy, load_causal_lm(str(tiny_model_dir)), ValueModel(load_reward_model(str(tiny_model_dir))),
              None, ["p"] * 4, None, None, cfg, 0, str(tmp_path / "ckpt"), SimpleNamespace(log=print), resume=ckpt)
