"""The real-model path on CPU: what a bf16 checkpoint does to PPO's reference, and PPO's global batch in
`prefopt check`."""

from __future__ import annotations

import types

import pytest
import torch

from conftest import TINY_TEXTS


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    """The tiny Llama of conftest's `tiny_model_dir`, saved in bfloat16 as hub chat models are."""
    from prefopt.models.loading import build_tiny_llama, build_tokenizer, save_model
    from prefopt.dist.process import seed_everything

    seed_everything(0)
    tok = build_tokenizer(TINY_TEXTS, vocab_size=300)
    model = build_tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=256)
    return save_model(model.to(torch.bfloat16), tok, tmp_path_factory.mktemp("bf16") / "model")


def test_ppo_reference_matches_policy_at_step_0_from_bf16_checkpoint(bf16_model_dir):
    """The reference is loaded in float32 like the policy, so their log-probs agree exactly before any update
    (KL 0 at step 0). Loaded in the checkpoint's bf16 instead, it would not: that is checked too, so this test
    would catch the old behaviour."""
    from prefopt.models.loading import load_causal_lm
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.setup import load_models
    from prefopt.ppo.rollout import build_batch, policy_forward

    path = str(bf16_model_dir)
    cfg = PPOConfig(policy=path, reward_model=path, value_init="policy", total_episodes=4, rollout_batch_size=2,
                    mini_batch_size=2)
    ctx = types.SimpleNamespace(resolve=lambda value, model=True: value)  # paths are given as they are
    policy, ref, value, tok = load_models(ctx, cfg)
    assert next(policy.parameters()).dtype == torch.float32
    assert {p.dtype for p in ref.parameters()} == {torch.float32}

    prompts = [tok("Sort the numbers 3 1 2")["input_ids"], tok("hi")["input_ids"]]
    responses = [tok(r, add_special_tokens=False)["input_ids"] for r in ("1 2 3", "hello there")]
    batch = build_batch(prompts, responses, pad_id=tok.pad_token_id)
    with torch.no_grad():
        args = (batch["input_ids"], batch["attention_mask"], batch["mask"], 1.0)
        policy_logps, _ = policy_forward(policy, *args)
        ref_logps, _ = policy_forward(ref, *args)
        as_saved, _ = policy_forward(load_causal_lm(path).eval(), *args)  # the old reference: bf16
    assert batch["mask"].sum() > 0
    torch.testing.assert_close(ref_logps, policy_logps, rtol=0, atol=0)  # KL = logp - ref_logp = 0 per token
    assert not torch.equal(as_saved, policy_logps)


def test_ppo_global_batch_in_check():
    """PPO's global batch is rollout_batch_size (it runs on one process whatever launch.num_processes says);
    `prefopt check` warns when the recipe states another, naming PPO's own factors, and says PPO runs on one."""
    from prefopt.checks import problems_and_warnings
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.ppo.config import PPOConfig

    assert PPOConfig(rollout_batch_size=16, mini_batch_size=8).global_batch(4) == 16
    cfg = from_dict(ExperimentConfig, {
        "name": "x", "stages": ["sft", "reward", "ppo"], "launch": {"num_processes": 2},
        "ppo": {"rollout_batch_size": 16, "mini_batch_size": 8, "recipe_global_batch": 64}})
    _, warnings = problems_and_warnings(cfg)
    ppo = [w for w in warnings if w.startswith("ppo: global batch")]
    assert ppo == ["ppo: global batch is 16 (ppo.rollout_batch_size, split over the processes) but the recipe "
                   "states 64 (ppo.recipe_global_batch)"]
    cfg.ppo.recipe_global_batch = 16
    assert not [w for w in problems_and_warnings(cfg)[1] if w.startswith("ppo: global batch")]


@pytest.mark.parametrize("section,values,key", [
    ("evaluate", {"temperature": 0.005}, "must be 0 (greedy) or in [0.01, 2]"),
    ("evaluate", {"temperature": 0, "samples_per_prompt": 1, "best_of_n": [1, 4]}, "best_of_n asks for 4 samples"),
    ("evaluate", {"temperature": 0, "samples_per_prompt": 2}, "samples_per_prompt asks for 2 samples"),
    ("self_instruct", {"temperature": 2.5}, "rejects one above 2"),
])
def test_evaluate_and_self_instruct_refuse_temperatures_vllm_would_change(section, values, key):
    """The evaluate and self_instruct sections sample through vLLM on a GPU machine too: the same limits."""
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig

    with pytest.raises(ValueError, match="temperature") as err:
        from_dict(ExperimentConfig, {"name": "t", section: values})
    assert key in str(err.value)
