"""DPO / IPO / cDPO / SimPO objectives on hand-picked log-probs, and DPO against TRL's DPOTrainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from prefopt.dpo.loss import dpo_loss
from prefopt.simpo.loss import simpo_loss


def softplus(x: float) -> float:
    """-log sigma(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


# Two pairs. Policy chosen/rejected logps and reference logps:
#   pair 1: pi (-1, -3), ref (-2, -2): logratios (+1, -1), h = 2
#   pair 2: pi (-2, -1), ref (-2, -2): logratios ( 0, +1), h = -1
PI_C, PI_R = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
REF_C, REF_R = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])


def test_dpo_sigmoid_hand_computed():
    """beta 0.5: beta*h = 1 and -0.5; loss = mean(log(1+e^-1), log(1+e^0.5)) = mean(0.31326, 0.97408) = 0.64367.
    rewards = 0.5 * logratios: chosen (0.5, 0) -> 0.25; rejected (-0.5, 0.5) -> 0; margins (1, -0.5) -> 0.25;
    accuracies (1, 0) -> 0.5; logps/chosen mean(-1, -2) = -1.5."""
    loss, m = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5)
    assert_close(loss, torch.tensor((softplus(1.0) + softplus(-0.5)) / 2))
    assert_close(loss, torch.tensor(0.64367), atol=1e-5, rtol=0)
    assert_close(m["rewards/chosen"], torch.tensor(0.25))
    assert_close(m["rewards/rejected"], torch.tensor(0.0))
    assert_close(m["rewards/margins"], torch.tensor(0.25))
    assert_close(m["rewards/accuracies"], torch.tensor(0.5))
    assert_close(m["logps/chosen"], torch.tensor(-1.5))
    assert_close(m["logps/rejected"], torch.tensor(-2.0))
    assert not any(v.requires_grad for v in m.values())


def test_cdpo_hand_computed():
    """eps 0.1, beta*h = 1 and -0.5: per pair 0.9*log(1+e^-bh) + 0.1*log(1+e^bh):
    pair 1: 0.9*0.31326 + 0.1*1.31326 = 0.41326; pair 2: 0.9*0.97408 + 0.1*0.47408 = 0.92408; mean 0.66867."""
    loss, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, loss_type="cdpo", label_smoothing=0.1)
    expected = (0.9 * softplus(1.0) + 0.1 * softplus(-1.0) + 0.9 * softplus(-0.5) + 0.1 * softplus(0.5)) / 2
    assert_close(loss, torch.tensor(expected))
    assert_close(loss, torch.tensor(0.66867), atol=1e-5, rtol=0)
    # eps = 0 is plain DPO
    assert_close(dpo_loss(PI_C, PI_R, REF_C, REF_R, 0.5, "cdpo", 0.0)[0], dpo_loss(PI_C, PI_R, REF_C, REF_R, 0.5)[0])


def test_ipo_hand_computed():
    """tau = beta = 0.25, so 1/(2 tau) = 2. h = 2 and -1: (2-2)^2 = 0, (-1-2)^2 = 9; mean 4.5."""
    loss, m = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.25, loss_type="ipo")
    assert_close(loss, torch.tensor(4.5))
    assert_close(m["rewards/margins"], torch.tensor(0.25 * (2 - 1) / 2))


def test_simpo_hand_computed():
    """beta 2, gamma/beta 0.5 (gamma = 1). Average logps: pair 1 (-0.5, -1.5), pair 2 (-1, -1).
    beta*(avg_w - avg_l - 0.5) = 2*(1 - 0.5) = 1 and 2*(0 - 0.5) = -1; loss = mean(log(1+e^-1), log(1+e)) =
    mean(0.31326, 1.31326) = 0.81326. Rewards = 2*avg: chosen mean(-1, -2) = -1.5, rejected mean(-3, -2) = -2.5,
    margins 1.0, accuracies (1, 0) -> 0.5. With sft_weight 0.5 and chosen NLL (1, 3): + 0.5*2 = 1.81326."""
    c, r = torch.tensor([-0.5, -1.0]), torch.tensor([-1.5, -1.0])
    loss, m = simpo_loss(c, r, beta=2.0, gamma_beta_ratio=0.5)
    assert_close(loss, torch.tensor(0.81326), atol=1e-5, rtol=0)
    assert_close(m["rewards/chosen"], torch.tensor(-1.5))
    assert_close(m["rewards/rejected"], torch.tensor(-2.5))
    assert_close(m["rewards/margins"], torch.tensor(1.0))
    assert_close(m["rewards/accuracies"], torch.tensor(0.5))
    assert_close(m["logps/chosen"], torch.tensor(-0.75))
    loss_sft, m = simpo_loss(c, r, 2.0, 0.5, sft_weight=0.5, chosen_nll=torch.tensor([1.0, 3.0]))
    assert_close(loss_sft, torch.tensor(1.81326), atol=1e-5, rtol=0)
    assert_close(m["sft_loss"], torch.tensor(2.0))


def test_simpo_margin_lowers_loss_and_gamma_raises_it():
    c, r = torch.tensor([-1.0]), torch.tensor([-2.0])
    base = simpo_loss(c, r, 2.0, 0.5)[0]
    assert simpo_loss(c + 0.5, r, 2.0, 0.5)[0] < base
    assert simpo_loss(c, r, 2.0, 1.0)[0] > base


# ------------------------------------------------------------------------------------------ against TRL


def _trl_trainer(policy_dir, ref_model, rows, tmp_path, loss: dict):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from prefopt.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(policy_dir))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", beta=0.5, max_length=512, bf16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=len(rows), use_cpu=True, **loss)
    return DPOTrainer(model=load_causal_lm(str(policy_dir), "float32"), ref_model=ref_model, args=args,
                      train_dataset=Dataset.from_list(rows), processing_class=tok)


@pytest.fixture(scope="module")
def trl_setup(tiny_model_dir, tmp_path_factory):
    """Policy = the tiny model; reference = another random init, so the log-ratios are far from 0."""
    from prefopt.data.templates import alpaca_prompt
    from prefopt.models import build_tiny_llama, load_tokenizer
    from prefopt.utils import seed_everything

    tok = load_tokenizer(str(tiny_model_dir))
    seed_everything(1)
    ref = build_tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=64).eval()
    rows = [{"prompt": alpaca_prompt("Sort the numbers in ascending order.", "3 1 2"), "chosen": "1 2 3",
             "rejected": "3 2 1"},
            {"prompt": alpaca_prompt("Say hello."), "chosen": "hello there", "rejected": "the quick brown fox"}]
    return tok, ref, rows, tmp_path_factory.mktemp("trl")


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("cdpo", 0.2)])
def test_dpo_matches_trl(trl_setup, tiny_model_dir, loss_type, eps):
    """TRL's DPOTrainer.compute_loss on one batch equals dpo_loss on log-probs from our own tokenization.

    Also checks our pair tokenization gives TRL's exact token ids, and that the recipe's cDPO mapping onto TRL's
    losses (2(1-e) sigmoid - (1-2e) robust) is cDPO."""
    from prefopt.dpo.recipe import trl_loss
    from prefopt.logps import sequence_logps
    from prefopt.preference_data import collate_pairs, tokenize_pairs

    tok, ref, rows, tmp = trl_setup
    trainer = _trl_trainer(tiny_model_dir, ref, rows, tmp, trl_loss(loss_type, eps))
    batch = next(iter(trainer.get_train_dataloader()))
    # TRL's dataloader may shuffle: map its chosen rows back to ours by the token ids
    ours = collate_pairs(tokenize_pairs(rows, tok, 512), tok.pad_token_id, 512)
    order = [next(j for j in range(2) if torch.equal(
        ours["input_ids"][j][ours["attention_mask"][j].bool()], batch["input_ids"][i][batch["attention_mask"][i].bool()]))
        for i in range(2)]
    idx = torch.tensor(order + [o + 2 for o in order])
    for k in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[k][idx], batch[k]), k
    trainer.model.eval()
    with torch.no_grad():
        trl_value = trainer.compute_loss(trainer.model, batch)
        pi, _ = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        rf, _ = sequence_logps(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    mine, _ = dpo_loss(pi[:2], pi[2:], rf[:2], rf[2:], beta=0.5, loss_type=loss_type, label_smoothing=eps)
    assert abs(mine.item() - math.log(2)) > 1e-3  # a non-trivial point, not the h = 0 start
    assert_close(trl_value, mine, atol=1e-5, rtol=1e-5)
