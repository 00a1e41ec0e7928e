"""prefopt.memory_plan: parameter counts from config.json alone, and one stage's per-GPU figure by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from prefopt.config import from_dict
from prefopt.experiment import load_config
from prefopt.experiment import ExperimentConfig
from prefopt.memory_plan import KNOWN, backend_of, count_params, model_size, stage_plan

# V=100, h=8, 2 layers, 2 heads of 4, 1 key/value head (GQA), MLP 16, untied
TINY = dict(model_type="llama", vocab_size=100, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=4, intermediate_size=16, tie_word_embeddings=False,
            max_position_embeddings=64, architectures=["LlamaForCausalLM"])


def test_parameter_count_by_hand():
    """embedding 100*8 = 800
    per layer: q 8*(2*4) = 64, o 64, k 8*(1*4) = 32, v 32 -> 192; MLP 3*8*16 = 384; two norms 2*8 = 16 -> 592
    2 layers 1184, final norm 8, lm_head (untied) 800: 800 + 1184 + 8 + 800 = 2792.
    Tied: 1992. Gemma-2 (4 norms per layer: 608, tied by default): 800 + 1216 + 8 = 2024.
    Qwen2 (q/k/v biases 8 + 4 + 4 per layer): 2792 + 32 = 2824."""
    assert count_params(TINY) == (2792, 592, 800)
    assert count_params({**TINY, "tie_word_embeddings": True})[0] == 1992
    gemma = {k: v for k, v in TINY.items() if k != "tie_word_embeddings"}
    assert count_params({**gemma, "model_type": "gemma2"})[0] == 2024
    assert count_params({**TINY, "model_type": "qwen2"})[0] == 2824
    # a one-label classifier: no lm_head, a 1 x 8 score head
    assert count_params({**TINY, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1})[0] == 2000


@pytest.mark.parametrize("family,extra", [
    ("llama", {}), ("mistral", {}), ("gemma2", {"head_dim": 16}), ("qwen2", {}), ("qwen3", {"head_dim": 16}),
    ("gemma3_text", {"head_dim": 16}), ("phi3", {})])
def test_count_equals_the_model_transformers_builds(family, extra):
    """The formula against the real module tree (built on the meta device: no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=48, **extra)
    config = AutoConfig.for_model(family, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter: counted once
    assert count_params(config.to_dict())[0] == real


def test_known_hub_models_have_their_published_sizes():
    """gemma-2-9b: 9,241,705,984 parameters; Llama-3-8B 8,030,261,248; Qwen2.5-7B 7,615,616,512; Mistral-7B
    7,241,732,096 (the counts their model cards and safetensors indexes give)."""
    sizes = {k: model_size(k).params for k in KNOWN}
    assert sizes["google/gemma-2-9b-it"] == 9_241_705_984
    assert sizes["meta-llama/Meta-Llama-3-8B-Instruct"] == 8_030_261_248
    assert sizes["Qwen/Qwen2.5-7B-Instruct"] == 7_615_616_512
    assert sizes["mistralai/Mistral-7B-Instruct-v0.2"] == 7_241_732_096
    assert sizes["huggyllama/llama-7b"] == 6_738_415_616
    assert "built-in table" in model_size("google/gemma-2-9b-it").source
    assert model_size("nobody/unknown-model-xyz") is None


def test_simpo_per_gpu_figure_under_zero3_by_hand(tmp_path):
    """SimPO on TINY (P = 2792), DeepSpeed ZeRO-3 over 2 processes, bf16, per-device 1 pair, max_length 4, padded
    layout, no checkpointing, logits in one piece (logps_chunk_size 0), SDPA (no score term):
      weights bf16 sharded      2792 * 2 / 2            =  2792
      gradients bf16 sharded    2792 * 2 / 2            =  2792
      AdamW (m, v, fp32 master) 2792 * 12 / 2           = 16752
      gathered embedding+layer  2 * (800 + 592)         =  2784
      activations               2 layers * 34 * (4 tokens * 2 rows * 8)  = 2 * 2176 = 4352
      logits                    (2 * 1 * 4 tokens) * 100 * 4 B * 2     =  6400
      total                                                            = 35872 bytes
    With gradient checkpointing the activations are 2 * (2 * 64) + 2176 = 2432 (total 33952); with
    logps_chunk_size 2 the logits are 2 * 100 * 4 * 2 = 1600."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    simpo = dict(model=str(folder), bf16=True, per_device_train_batch_size=1, max_length=4, layout="padded",
                 logps_chunk_size=0, gradient_checkpointing=False)
    cfg = from_dict(ExperimentConfig, {"name": "m", "stages": ["simpo"], "simpo": simpo})
    zero3 = backend_of({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3},
                        "mixed_precision": "bf16"}, 2)
    plan = stage_plan(cfg, "simpo", zero3, 80)
    items = [v for _, v in plan.phases[0].items]
    assert items == [2792, 2792, 16752, 2784, 4352, 6400]
    assert plan.peak == 35872
    cfg.simpo.gradient_checkpointing = True
    assert stage_plan(cfg, "simpo", zero3, 80).peak == 33952
    cfg.simpo.logps_chunk_size = 2
    assert stage_plan(cfg, "simpo", zero3, 80).peak == 33952 - 6400 + 1600
    # DDP on 2 processes: fp32 weights (the loop's masters, bf16 autocast), nothing sharded, no gathered buffer:
    # 2792 * (4 + 4 + 8) = 44672, + activations 2432 + logits 1600
    ddp = backend_of({"distributed_type": "MULTI_GPU", "mixed_precision": "bf16"}, 2)
    assert stage_plan(cfg, "simpo", ddp, 80).peak == 44672 + 2432 + 1600
    # ZeRO-2 shards gradients and optimizer states only: 2792*2 + 2792*2/2 + 2792*12/2 + 2432 + 1600
    zero2 = backend_of({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2},
                        "mixed_precision": "bf16"}, 2)
    assert stage_plan(cfg, "simpo", zero2, 80).peak == 5584 + 2792 + 16752 + 2432 + 1600


def test_fsdp_backends_shard_everything():
    full = backend_of({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2}}, 8)
    assert (full.shard_weights, full.shard_grads, full.shard_optimizer, full.n) == (True, True, True, 8)
    grad_op = backend_of({"distributed_type": "FSDP", "fsdp_config": {"fsdp_sharding_strategy": "SHARD_GRAD_OP"}}, 8)
    assert not grad_op.shard_weights and grad_op.shard_optimizer
    hybrid = backend_of({"distributed_type": "FSDP", "fsdp_config": {"fsdp_sharding_strategy": "HYBRID_SHARD"}}, 16, 2)
    assert hybrid.n == 8  # sharded inside a node


def test_gemma_recipe_plan_fits_8x80gb():
    """The target: `prefopt check experiments/simpo/gemma2_9b_it.yaml` prints a plan for 8 x 80 GB and passes."""
    out = subprocess.run([sys.executable, "-m", "prefopt", "check", "experiments/simpo/gemma2_9b_it.yaml"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "training stages: DeepSpeed ZeRO-3 over 8 processes" in text
    simpo = [ln for ln in text.splitlines() if ln.startswith("  simpo     training step")]
    assert simpo and "fits" in simpo[0], text
    assert "google/gemma-2-9b-it: 9.24B parameters" in text and "RLHFlow/ArmoRM-Llama3-8B-v0.1: 7.51B" in text


def test_what_does_not_fit_is_said(tmp_path, capsys):
    from prefopt.pipeline import check

    cfg = load_config(REPO / "experiments/simpo/gemma2_9b_it.yaml", ["--launch.gpu_memory_gb=24"])
    assert check(cfg) == 0  # an estimate warns; it does not stop a run
    out = capsys.readouterr().out
    assert "simpo     training step" in out and "DOES NOT FIT" in out
    assert "WARNING: simpo: training step needs about 26.6 GB per GPU, more than launch.gpu_memory_gb 24" in out


def test_unknown_model_is_size_unknown(capsys):
    from prefopt.pipeline import check

    cfg = from_dict(ExperimentConfig, {"name": "u", "stages": ["generate"],
                                       "generate": {"model": "someone/not-a-known-model",
                                                    "prompts": {"path": "p.jsonl"}}})
    check(cfg)
    assert "someone/not-a-known-model: size unknown" in capsys.readouterr().out


def test_ppo_rollout_pass_by_hand(tmp_path):
    """PPO on TINY (P = 2792, fp32 on one process, a reward function: no reward model; the value model sized as the
    policy), forward_batch_size 4 responses of max_new_tokens 6. The rollout pass holds what the step holds but its
    activations and logits:
      policy weights, gradients, AdamW   2792 * (4 + 4 + 8)        = 44672
      reference (fp32, whole)            2792 * 4                  = 11168
      value model weights, grads, AdamW  2792 * (4 + 4 + 8)        = 44672
      forward activations                6 * 4 * (4 * 8 + 3 * 16) * 4 B = 7680
      logits, log-softmax, entropy       24 tokens * 100 * 4 B * 3 = 28800
      total                                                        = 136992 bytes
    and with forward_batch_size 64 (the default), 16x the last two: the pass, not the step, is the stage's peak."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    ppo = dict(policy=str(folder), reward_fn="task:gold", forward_batch_size=4, max_new_tokens=6, mini_batch_size=2,
               rollout_batch_size=4, total_episodes=4)
    cfg = from_dict(ExperimentConfig, {"name": "m", "stages": ["ppo"], "ppo": ppo})
    one = backend_of({"distributed_type": "MULTI_GPU"}, 1)
    plan = stage_plan(cfg, "ppo", one, 80)
    roll = [p for p in plan.phases if p.name == "PPO rollout pass"]
    assert len(roll) == 1 and [v for _, v in roll[0].items] == [11168, 11168, 22336, 11168, 11168, 11168, 22336,
                                                                  7680, 28800]
    assert roll[0].total == 136992
    cfg.ppo.forward_batch_size = 64
    plan = stage_plan(cfg, "ppo", one, 80)
    assert plan.peak == 136992 - 7680 - 28800 + 16 * (7680 + 28800)
