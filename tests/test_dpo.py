"""The `dpo` stage run as a user runs it (`python -m prefopt dpo CONFIG`), and its reference modes."""

from __future__ import annotations

import math

import pytest
import torch

from pair_helpers import pair_logps, run_prefopt, state_dict, write_config, write_pairs
from prefopt.dpo.loss import dpo_loss
from prefopt.runtime.tracking import read_metrics

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected"]
TRAIN = {"per_device_train_batch_size": 8, "lr_scheduler_type": "constant", "max_grad_norm": 0.0,
         "logging_steps": 1, "save_steps": 100, "max_length": 256}


def test_dpo_smoke_lowers_loss_on_training_pairs(tmp_path, tiny_model_dir):
    """4 steps (2 epochs of 16 pairs): the saved policy has a DPO loss below log 2 against its start."""
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    cfg = write_config(tmp_path, "dpo", {"model": str(tiny_model_dir), "pairs": str(pairs), "learning_rate": 5e-3,
                                         "num_train_epochs": 2, **TRAIN})
    run_prefopt("dpo", str(cfg))
    out = tmp_path / "runs" / "t" / "dpo"
    assert (out / "model" / "model.safetensors").exists() and (out / "_DONE.json").exists()
    rows = [r for r in read_metrics(out) if "rewards/margins" in r]
    assert len(rows) == 4 and all(k in rows[0] for k in METRICS)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    pc, pr, _, _ = pair_logps(out / "model", pairs)
    rc, rr, _, _ = pair_logps(tiny_model_dir, pairs)
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() < math.log(2) - 0.02
    assert m["rewards/margins"].item() > 0.2


@pytest.mark.slow
def test_precomputed_and_loaded_reference_agree(tmp_path, tiny_model_dir, other_model_dir):
    """With a reference that differs from the policy, both modes give the same first-step loss and margins,
    and that loss is the DPO loss computed here from the two models' log-probs."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    firsts = {}
    for mode in ("precomputed", "loaded"):
        cfg = write_config(tmp_path, "dpo", {"model": str(tiny_model_dir), "ref_model": str(other_model_dir),
                                             "reference": mode, "pairs": str(pairs), "max_steps": 1, **TRAIN},
                           name=mode)
        run_prefopt("dpo", str(cfg))
        firsts[mode] = read_metrics(tmp_path / "runs" / mode / "dpo")[0]
    a, b = firsts["precomputed"], firsts["loaded"]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    pc, pr, _, _ = pair_logps(tiny_model_dir, pairs)
    rc, rr, _, _ = pair_logps(other_model_dir, pairs)
    expected, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert abs(expected.item() - math.log(2)) > 1e-3
    assert a["loss"] == pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.slow
def test_lora_base_reference(tmp_path, tiny_model_dir):
    """LoRA policy, reference = base with the adapter off: step 1 is log 2 (zero-initialised adapter), the saved
    model is merged (a plain checkpoint, no adapter files) and differs from the base."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    cfg = write_config(tmp_path, "dpo", {"model": str(tiny_model_dir), "pairs": str(pairs), "reference": "lora_base",
                                         "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
                                         "learning_rate": 1e-2, "max_steps": 3, **TRAIN})
    run_prefopt("dpo", str(cfg))
    out = tmp_path / "runs" / "t" / "dpo"
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert not (out / "model" / "adapter_config.json").exists()
    trained, base = state_dict(out / "model"), state_dict(tiny_model_dir)
    assert set(trained) == set(base)
    assert any(not torch.allclose(trained[k], base[k]) for k in base if "q_proj" in k)


@pytest.mark.slow
def test_dpo_stage_equals_trl_after_three_steps(tmp_path, tiny_model_dir, other_model_dir):
    """Our `dpo` stage (default reference: precomputed and cached; default layout: shared prompt, packed) and TRL's
    DPOTrainer (live reference model), both AdamW at a constant lr without clipping on the same 8 pairs: the weights
    after 3 optimizer steps agree to 1e-4. TRL is the oracle here, not the engine."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.preference.data import load_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    cfg = write_config(tmp_path, "dpo", {"model": str(tiny_model_dir), "ref_model": str(other_model_dir),
                                         "pairs": str(pairs), **TRAIN, "max_steps": 3, "learning_rate": 1e-2})
    run_prefopt("dpo", str(cfg))
    ours = state_dict(tmp_path / "runs" / "t" / "dpo" / "model")

    tok = load_tokenizer(str(tiny_model_dir))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", beta=0.1, learning_rate=1e-2, max_steps=3,
                     lr_scheduler_type="constant", max_grad_norm=0.0, per_device_train_batch_size=8, max_length=256,
                     bf16=False, gradient_checkpointing=False, use_cpu=True, save_strategy="no", seed=0)
    trainer = DPOTrainer(model=load_causal_lm(str(tiny_model_dir), "float32"),
                         ref_model=load_causal_lm(str(other_model_dir), "float32"), args=args,
                         train_dataset=Dataset.from_list(load_pairs(str(pairs), "alpaca", tok)), processing_class=tok)
    trainer.train()
    theirs = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    changed = 0
    for name, w in ours.items():
        torch.testing.assert_close(w, theirs[name], atol=1e-4, rtol=1e-3)
        changed += not torch.allclose(w, state_dict(tiny_model_dir)[name])
    assert changed > 0


def test_reference_with_another_tokenizer_is_refused(tmp_path, tiny_model_dir, other_model_dir):
    """A `ref_model` whose vocabulary differs from the policy's is refused before any training, naming the
    reference; a reference that shares the tokenizer (another init, same vocabulary) passes the same check."""
    from prefopt.experiment import load_config
    from prefopt.models.loading import build_tiny_llama, build_tokenizer, load_tokenizer, save_model
    from prefopt.preference.loop import check_same_tokenizer
    from prefopt.stage import run_stage

    tok = build_tokenizer(["Ein ganz anderer Text, mit anderen Wörtern und Zeichen: äöü ß 0 1 2 3."] * 20,
                          vocab_size=280)
    assert tok.get_vocab() != load_tokenizer(str(tiny_model_dir)).get_vocab()
    alien = save_model(build_tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64), tok, tmp_path / "alien")
    check_same_tokenizer(str(tiny_model_dir), str(other_model_dir), load_tokenizer(str(tiny_model_dir)))

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    cfg = load_config(str(write_config(tmp_path, "dpo", {"model": str(tiny_model_dir), "ref_model": str(alien),
                                                         "pairs": str(pairs), "max_steps": 1, **TRAIN})))
    with pytest.raises(ValueError, match=rf"reference {alien} does not use the policy's tokenizer"):
        run_stage(cfg, "dpo")
    out = tmp_path / "runs" / "t" / "dpo"
    assert not (out / "model").exists() and not (out / "_DONE.json").exists()
    assert not (tmp_path / "runs" / "t" / "cache").exists()  # refused before the reference pass


def test_negative_label_smoothing_is_a_config_error(tmp_path):
    """`--dpo.label_smoothing=-0.1`: the error names the key, the range and the value (as 0.5 does above it)."""
    from prefopt.experiment import load_config

    path = write_config(tmp_path, "dpo", {"model": str(tmp_path / "m"), "pairs": str(tmp_path / "p.jsonl")})
    with pytest.raises(ValueError) as err:
        load_config(str(path), ["--dpo.label_smoothing=-0.1"])
    assert "dpo.label_smoothing: must be >= 0 and < 0.5, got -0.1" in str(err.value)
    assert load_config(str(path), ["--dpo.loss_type=cdpo", "--dpo.label_smoothing=0.1"]).dpo.label_smoothing == 0.1


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_label_smoothing_with_a_loss_that_ignores_it_is_a_config_error(tmp_path, loss_type):
    """Only cDPO reads label_smoothing: with sigmoid or IPO it would change nothing (the loss is the same number, see
    tests/test_losses.py), so it is refused naming both keys; 0 is accepted with every loss."""
    from prefopt.experiment import load_config

    path = write_config(tmp_path, "dpo", {"model": str(tmp_path / "m"), "pairs": str(tmp_path / "p.jsonl")})
    with pytest.raises(ValueError) as err:
        load_config(str(path), [f"--dpo.loss_type={loss_type}", "--dpo.label_smoothing=0.1"])
    assert (f"dpo.label_smoothing: 0.1 does nothing with loss_type '{loss_type}' (only loss_type: cdpo reads it)"
            in str(err.value))
    assert load_config(str(path), [f"--dpo.loss_type={loss_type}"]).dpo.label_smoothing == 0.0
    # what the error saves the user from: the loss is unchanged by label_smoothing for this loss_type
    args = (torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]))
    plain = dpo_loss(*args, beta=0.5, loss_type=loss_type)[0]
    torch.testing.assert_close(dpo_loss(*args, beta=0.5, loss_type=loss_type, label_smoothing=0.1)[0], plain)
    assert not torch.allclose(dpo_loss(*args, beta=0.5, loss_type="cdpo", label_smoothing=0.1)[0], plain)
