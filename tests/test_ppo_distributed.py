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


FSDP_ON_CPU = REPO / "tests" / "fsdp_on_cpu"  # on PYTHONPATH: accelerate runs FSDP on CPU processes
# experiments/accelerate/fsdp2.yaml on two CPU processes (test_the_cpu_fsdp2_config_is_the_shipped_one)
FSDP2_CPU_CONFIG = FSDP_ON_CPU / "fsdp2_cpu.yaml"


def launcher(processes: int, fsdp: bool = False) -> list[str]:
    """`accelerate launch` on CPU processes; with `fsdp`, two processes under the FSDP2 config."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if fsdp:
        assert processes == 2
        return cmd + ["--config_file", str(FSDP2_CPU_CONFIG)]
    cmd += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
            "no"]
    return cmd + (["--multi_gpu"] if processes > 1 else [])


def launch(exp: Path, processes: int, fsdp: bool = False, **env) -> subprocess.CompletedProcess:
    """`accelerate launch -m prefopt ppo EXP` on CPU processes; with `fsdp`, under FSDP2 (tests/fsdp_on_cpu lets
    accelerate run FSDP on CPU processes)."""
    cmd = launcher(processes, fsdp) + ["-m", "prefopt", "ppo", str(exp)]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(fsdp, **env), capture_output=True, text=True, timeout=600)


def launch_env(fsdp: bool = False, **env) -> dict:
    paths = [str(REPO / "tests"), str(REPO / "tests" / "plugins")] + ([str(FSDP_ON_CPU)] if fsdp else [])
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "true",
            "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
            **env}


def metrics(stage_dir: Path) -> dict[int, dict]:
    from prefopt.runtime.tracking import read_metrics

    timing = ("time", "perf/")  # the row's clock and its window's throughput: not results
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(timing)} for r in read_metrics(stage_dir)}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"instruction": "Sort the numbers in ascending order.",
             "input": " ".join(str((i * 7 + j * 3) % 10) for j in range(3 + i % 3))} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, prompts_file) -> Path:
    """The reference run: 5 iterations of 12 episodes on one process. Returns its stage folder."""
    root = tmp_path_factory.mktemp("one")
    out = launch(ppo_experiment(root, tiny_model_dir, prompts_file), 1)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "runs" / "p" / "ppo"


def assert_same_run(a_dir: Path, b_dir: Path, tiny_model_dir) -> tuple[float, float]:
    """Two PPO runs logged the same metrics and ended with the same weights, within the tolerances above; returns
    (how far the weights moved, how far apart the runs ended)."""
    from safetensors.torch import load_file

    a, b = metrics(a_dir), metrics(b_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert a[step].keys() == b[step].keys()
        for k in a[step]:
            tol = {"abs": TIE_ATOL} if k in TIE_METRICS else {"rel": METRIC_RTOL, "abs": METRIC_ATOL}
            assert b[step][k] == pytest.approx(a[step][k], **tol), (step, k)
    assert a[5]["kl_coef"] != a[1]["kl_coef"]  # the adaptive controller moved and resumed with its state
    assert a[5]["reward"] != a[1]["reward"]
    wa, wb = load_file(a_dir / "model" / "model.safetensors"), load_file(b_dir / "model" / "model.safetensors")
    init = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert wa.keys() == wb.keys()
    moved = max((wa[k] - init[k]).abs().max().item() for k in wa)
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert moved > 100 * WEIGHT_ATOL and diff < WEIGHT_ATOL, (moved, diff)  # it trained, and the same way
    return moved, diff


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_kill(tmp_path, tiny_model_dir, prompts_file, one_process):
    """5 iterations of 12 episodes on one process, and on two processes killed by SIGKILL in the middle of
    iteration 4 (rank 1, while scoring) then rerun: the resumed two-process run logs every iteration once and ends
    with the one-process run's metrics and weights, within the tolerances above. Minibatches of 8 leave a last one
    of 4 in each epoch (split 2 + 2), and each process samples its 6 prompts in two chunks of 3."""
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
    from prefopt.runtime.tracking import read_metrics

    assert [r["step"] for r in read_metrics(d)] == [1, 2, 3, 4, 5]  # resumed, not restarted
    assert_same_run(one_process, d, tiny_model_dir)


@pytest.mark.slow
def test_fsdp2_matches_one_process_and_resumes_after_kill(tmp_path, tiny_model_dir, prompts_file, one_process):
    """The same run under FSDP2 on two CPU processes (policy, value model and reference sharded; synced
    generation; checkpoints written shard by shard), killed in the middle of iteration 4 and rerun: it ends where
    the one-process run does, within the same tolerances."""
    from prefopt.runtime.tracking import read_metrics

    two = ppo_experiment(tmp_path / "fsdp", tiny_model_dir, prompts_file)
    marker = tmp_path / "killed"
    out = launch(two, 2, fsdp=True, PPO_DIE_AFTER_CALLS="18", PPO_DIE_MARKER=str(marker))
    d = tmp_path / "fsdp" / "runs" / "p" / "ppo"
    assert out.returncode != 0 and marker.exists(), out.stderr[-3000:]
    assert sorted(p.name for p in (d / "checkpoints").glob("iter-*")) == ["iter-2", "iter-3"]
    # Sharded checkpoints: torch.distributed.checkpoint folders, one shard file per process.
    state = d / "checkpoints" / "iter-3" / "state"
    assert sorted(p.name for p in (state / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp",
                                                                                         "__1_0.distcp"]
    out = launch(two, 2, fsdp=True, PPO_DIE_AFTER_CALLS="18", PPO_DIE_MARKER=str(marker))
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "resuming from" in log and "iteration 3 of 5" in log
    assert "sharded (FSDP2)" in log
    summary = json.loads((d / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["iterations"] == 5
    assert [r["step"] for r in read_metrics(d)] == [1, 2, 3, 4, 5]
    assert_same_run(one_process, d, tiny_model_dir)


def test_sharded_generation_keeps_every_process_stepping(tiny_model_dir, tmp_path):
    """Under FSDP2 every decoding step is a collective forward pass. Process 0's response ends at its first token
    and process 1's runs 8 tokens: synced generation (what the ppo stage asks for under FSDP) keeps process 0
    stepping until process 1 is done. Without it process 0 leaves the collectives unmatched (measured: the run fails;
    a hang would meet the timeout here)."""
    cmd = launcher(2, fsdp=True) + [str(REPO / "tests" / "plugins" / "fsdp_generate.py"), str(tiny_model_dir),
                                    str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, env=launch_env(fsdp=True), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lengths = {p.name: p.read_text() for p in tmp_path.glob("rank-*")}  # response tokens, one file per process
    assert lengths == {"rank-0": "1", "rank-1": "8"}, out.stdout


def test_rollouts_generate_synced_under_fsdp_only(tiny_model_dir):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.setup import rollout_generator

    tok, policy = load_tokenizer(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir))
    for kind, synced in ((DistributedType.FSDP, True), (DistributedType.MULTI_CPU, False), (DistributedType.NO, False)):
        gen = rollout_generator(None, PPOConfig(), policy, tok, SimpleNamespace(distributed_type=kind), ["p"])
        assert gen.synced is synced, kind


@pytest.mark.slow
def test_fsdp2_shards_the_reference_and_reward_model_as_the_config_says(tmp_path, tiny_model_dir, prompts_file):
    """With a reward model (and the value model started from it), 2 iterations under FSDP2 on two CPU processes,
    once with the reference and reward model sharded and once with a full copy of each on every process: the
    stage says which it did, and both give the same run."""
    from prefopt.models.loading import load_reward_model, load_tokenizer, save_model
    from prefopt.dist.process import seed_everything

    seed_everything(1)
    rm = tmp_path / "rm"
    save_model(load_reward_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), rm)
    runs = {}
    for shard in (True, False):
        exp = ppo_experiment(tmp_path / f"shard-{shard}", tiny_model_dir, prompts_file, reward_fn="",
                             reward_model=str(rm), value_init="reward", total_episodes=24,
                             shard_reference=shard, shard_reward_model=shard)
        out = launch(exp, 2, fsdp=True)
        assert out.returncode == 0, out.stderr[-3000:]
        log = out.stdout + out.stderr
        if shard:
            assert "the reference sharded (ppo.shard_reference)" in log
            assert "sharded (ppo.shard_reward_model)" in log
        else:
            assert "the reference a full copy on each" in log and "a full copy on each process" in log
        runs[shard] = metrics(tmp_path / f"shard-{shard}" / "runs" / "p" / "ppo")
    assert sorted(runs[True]) == [1, 2]
    for step in (1, 2):
        for k in ("reward", "kl", "loss/policy", "loss/value"):
            assert runs[True][step][k] == pytest.approx(runs[False][step][k], rel=METRIC_RTOL, abs=METRIC_ATOL)
    assert runs[True][1]["reward"] != 0.0 and runs[True][1]["kl"] == 0.0  # the RM scored; KL 0 before any update


def test_the_cpu_fsdp2_config_is_the_shipped_one():
    """What the FSDP2 tests launch is experiments/accelerate/fsdp2.yaml's FSDP setup, on two CPU processes."""
    shipped = yaml.safe_load((REPO / "experiments" / "accelerate" / "fsdp2.yaml").read_text())
    tested = yaml.safe_load(FSDP2_CPU_CONFIG.read_text())
    assert tested["fsdp_config"] == shipped["fsdp_config"]
    assert tested["distributed_type"] == shipped["distributed_type"] == "FSDP"
    assert tested["use_cpu"] is True and tested["num_processes"] == 2


def test_launches_ppo_cannot_use_are_refused(tmp_path):
    """Batch sizes that do not split over the processes, and accelerate configs the stage cannot use (DeepSpeed,
    FSDP version 1), from `prefopt check` (naming the keys) and from the stage itself."""
    from prefopt.checks import problems_and_warnings
    from prefopt.config import ConfigError, from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.setup import check_world

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
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from prefopt.ppo.setup import check_distributed_type

    def launch_of(kind, version=None):
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(
            fsdp_plugin=SimpleNamespace(fsdp_version=version)))

    for ok in (launch_of(DistributedType.MULTI_GPU), launch_of(DistributedType.FSDP, 2)):
        check_distributed_type(ok)
    with pytest.raises(ConfigError, match=r"this launch is FSDP version 1 \(the launch.accelerate_config file\)"):
        check_distributed_type(launch_of(DistributedType.FSDP, 1))
    with pytest.raises(ConfigError, match=r"this launch is DEEPSPEED"):
        check_distributed_type(launch_of(DistributedType.DEEPSPEED))

    cfg = from_dict(ExperimentConfig, {
        "name": "x", "stages": ["ppo"],
        "launch": {"num_processes": 2, "accelerate_config": str(REPO / "experiments/accelerate/deepspeed_zero3.yaml")},
        "ppo": {"policy": "m", "reward_fn": "task:gold", "rollout_batch_size": 16, "mini_batch_size": 8}})
    problems, _ = problems_and_warnings(cfg)
    assert any("is DEEPSPEED; the ppo stage runs on one process, under DDP (MULTI_GPU / MULTI_CPU) or FSDP2" in p
               for p in problems), problems
    # FSDP: version 2 runs (tested above on CPU processes); version 1 is refused, naming the key to change.
    for name, refused in (("fsdp2.yaml", False), ("fsdp.yaml", True)):
        cfg = from_dict(ExperimentConfig, {
            "name": "x", "stages": ["ppo"],
            "launch": {"num_processes": 2, "accelerate_config": str(REPO / "experiments/accelerate" / name)},
            "ppo": {"policy": "m", "reward_fn": "task:gold", "rollout_batch_size": 16, "mini_batch_size": 8}})
        problems, _ = problems_and_warnings(cfg)
        got = [p for p in problems if p.startswith("ppo: launch.accelerate_config")]
        assert bool(got) == refused, (name, problems)
        if refused:
            assert "is FSDP version 1; the ppo stage runs under FSDP2 (fsdp_config.fsdp_version: 2" in got[0]

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

    from prefopt.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.recipe import train
    from prefopt.ppo.setup import make_accelerator, rollout_generator
    from prefopt.ppo.rollout import ValueModel
    from prefopt.dist.process import seed_everything

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

    from prefopt.models.loading import load_tokenizer
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.setup import rollout_generator

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
    from prefopt.models.loading import load_causal_lm, load_reward_model
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.checkpoint import TRAINER_STATE, latest_checkpoint
    from prefopt.ppo.recipe import train
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
