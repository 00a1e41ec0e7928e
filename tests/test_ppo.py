"""The `ppo` stage: resume equals an uninterrupted run, a smoke run launched as a user would, and PPO raising a
reward it can learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from prefopt.generation.base import Completion

REPO = Path(__file__).resolve().parents[1]
METRICS = ["reward", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "loss/policy", "loss/value",
           "explained_variance", "length", "eos_fraction"]


class LocalGenerator:
    """Stand-in for prefopt.generation.hf.TransformersGenerator while that backend is not in the tree."""

    name = "local"

    def __init__(self, model, tokenizer=None, batch_size=64):
        self.model, self.tok = model, tokenizer

    @torch.no_grad()
    def generate(self, prompts, sampling):
        torch.manual_seed(sampling.seed)
        self.tok.padding_side = "left"
        enc = self.tok(prompts, return_tensors="pt", padding=True)
        out = self.model.generate(**enc, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                                  top_k=0, max_new_tokens=sampling.max_new_tokens,
                                  eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
        self.tok.padding_side = "right"
        res = []
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            ids = row[: row.index(self.tok.eos_token_id) + 1] if self.tok.eos_token_id in row else row
            res.append([Completion(self.tok.decode(ids, skip_special_tokens=True), ids,
                                   ids[-1] == self.tok.eos_token_id)])
        return res


def has_hf_backend() -> bool:
    try:
        import prefopt.generation.hf  # noqa: F401
    except ImportError:
        return False
    return True


def generator_class():
    if has_hf_backend():
        from prefopt.generation.hf import TransformersGenerator

        return TransformersGenerator
    return LocalGenerator


@pytest.fixture
def generator_backend(monkeypatch):
    """The real transformers backend when it exists, else the local stand-in (in-process runs only)."""
    if not has_hf_backend():
        monkeypatch.setitem(sys.modules, "prefopt.generation.hf",
                            types.SimpleNamespace(TransformersGenerator=LocalGenerator))


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny reward model: the tiny Llama's backbone with a fresh (seeded) scalar head."""
    from prefopt.models.loading import load_reward_model, load_tokenizer, save_model
    from prefopt.dist.process import seed_everything

    seed_everything(1)
    out = tmp_path_factory.mktemp("rm") / "rm"
    save_model(load_reward_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), out)
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"instruction": "Sort the numbers in ascending order.", "input": " ".join(str((i * 7 + j) % 10)
             for j in range(3))} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(tmp_path: Path, name: str, tiny_model_dir, rm_dir, prompts_file, **ppo) -> Path:
    section = {"policy": str(tiny_model_dir), "reward_model": str(rm_dir), "prompts": {"path": str(prompts_file)},
               "total_episodes": 16, "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2,
               "max_new_tokens": 6, "learning_rate": 1e-3, "value_learning_rate": 1e-3, "save_every": 1, **ppo}
    cfg = {"name": name, "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "stages": ["ppo"],
           "ppo": section}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    from prefopt.runtime.tracking import read_metrics

    # A resumed run appends; the last row of a step is the one the finished run stands on.
    timing = ("time", "perf/")  # the row's clock and its window's throughput: not results
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(timing)} for r in read_metrics(run_dir)}


def test_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, rm_dir, prompts_file, generator_backend,
                                          monkeypatch):
    """3 iterations straight vs 2, a crash right after checkpoint 2, and a resumed run: same weights and metrics."""
    from safetensors.torch import load_file

    from prefopt.experiment import load_config
    from prefopt.ppo import recipe
    from prefopt.stage import run_stage

    kw = {"total_episodes": 24, "kl_target": 1.0, "kl_horizon": 100}  # adaptive KL: its state must resume too
    straight = load_config(write_config(tmp_path / "a", "straight", tiny_model_dir, rm_dir, prompts_file, **kw))
    run_stage(straight, "ppo")

    resumed = load_config(write_config(tmp_path / "b", "resumed", tiny_model_dir, rm_dir, prompts_file, **kw))
    save = recipe.save_checkpoint

    def save_then_die(accelerator, folder, iteration, *args, **kwargs):
        out = save(accelerator, folder, iteration, *args, **kwargs)
        if iteration == 2:
            raise KeyboardInterrupt("killed after checkpoint 2")
        return out

    monkeypatch.setattr(recipe, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage(resumed, "ppo")
    assert not (resumed.root / "ppo" / "model").exists()
    monkeypatch.setattr(recipe, "save_checkpoint", save)
    summary = run_stage(resumed, "ppo")
    assert summary["iterations"] == 3 and summary["episodes"] == 24

    from prefopt.runtime.tracking import read_metrics

    # Resumed, not restarted: steps 1-2 were logged once (before the crash), step 3 once (after).
    assert [r["step"] for r in read_metrics(resumed.root / "ppo")] == [1, 2, 3]
    a, b = metrics_by_step(straight.root / "ppo"), metrics_by_step(resumed.root / "ppo")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step].keys() == b[step].keys()
        for k in a[step]:
            assert a[step][k] == pytest.approx(b[step][k], rel=1e-5, abs=1e-6), (step, k)
    assert a[3]["kl_coef"] != a[1]["kl_coef"]  # the controller moved, and resumed with its state
    wa = load_file(straight.root / "ppo" / "model" / "model.safetensors")
    wb = load_file(resumed.root / "ppo" / "model" / "model.safetensors")
    init = load_file(Path(tiny_model_dir) / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(wa[k], init[k]) for k in wa)  # it trained
    kept = sorted(p.name for p in (resumed.root / "ppo" / "checkpoints").iterdir())
    assert kept == ["iter-2", "iter-3"]


@pytest.mark.skipif(not has_hf_backend(), reason="prefopt.generation.hf not in the tree yet")
def test_smoke_cli(tmp_path, tiny_model_dir, rm_dir, prompts_file):
    """`python -m prefopt ppo CONFIG` for 2 iterations: every metric logged, the policy saved, a summary."""
    cfg = write_config(tmp_path, "smoke", tiny_model_dir, rm_dir, prompts_file, value_init="policy",
                       whiten_rewards=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "prefopt", "ppo", str(cfg)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "smoke" / "ppo"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for name in METRICS:
        assert all(r[name] is not None for r in rows), name
    assert 0 < rows[0]["length"] <= 6 and 0 <= rows[0]["eos_fraction"] <= 1
    assert (run_dir / "model" / "model.safetensors").exists() and (run_dir / "model" / "tokenizer.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["episodes"] == 16
    assert (run_dir / "_DONE.json").exists()


def test_ppo_raises_a_learnable_reward(tiny_model_dir, tmp_path):
    """Reward = share of response tokens with an even id (about 0.5 for the random tiny model, with spread
    between samples). PPO must raise it: both in the rollouts and in the policy's own probability mass on even
    tokens at the first response position."""
    from prefopt.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.recipe import train
    from prefopt.ppo.rollout import ValueModel
    from prefopt.dist.process import seed_everything

    seed_everything(0)
    tok = load_tokenizer(str(tiny_model_dir))
    policy, ref = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir))
    value = ValueModel(load_reward_model(str(tiny_model_dir)))
    prompts = [f"Sort: {i} {i + 3} {i + 1}\n" for i in range(16)]
    even = torch.arange(len(tok)) % 2 == 0

    def score(prompts, completions):
        return torch.tensor([sum(t % 2 == 0 for t in c.token_ids) / max(len(c.token_ids), 1) for c in completions])

    def even_mass() -> float:
        enc = tok(prompts, return_tensors="pt", padding=True)
        last = enc["attention_mask"].sum(1) - 1
        with torch.no_grad():
            probs = policy(**enc).logits[torch.arange(len(prompts)), last].softmax(-1)
        return probs[:, even].sum(-1).mean().item()

    class Record:
        def __init__(self):
            self.rows = []

        def log(self, metrics, step=None):
            self.rows.append(metrics)

    cfg = PPOConfig(total_episodes=16 * 24, rollout_batch_size=16, mini_batch_size=8, ppo_epochs=4,
                    max_new_tokens=8, learning_rate=3e-3, value_learning_rate=3e-3, kl_coef=0.01,
                    missing_eos_penalty=0.0, save_every=100)
    before = even_mass()
    rec = Record()
    train(policy, ref, value, tok, prompts, score, generator_class()(policy, tokenizer=tok), cfg, seed=0,
          ckpt_dir=tmp_path / "ckpt", tracker=rec)
    rewards = [r["reward"] for r in rec.rows]
    assert len(rewards) == 24
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.15, rewards
    assert even_mass() > before + 0.15
    assert rec.rows[-1]["kl"] > 0  # it moved away from the reference, and says so
