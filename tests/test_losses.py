"""DPO / IPO / cDPO / RPO / SimPO / ORPO / Bradley-Terry / PPO on hand-picked numbers, and each against TRL as the oracle."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from prefopt.dpo.loss import dpo_loss
from prefopt.ppo.loss import ppo_loss
from prefopt.preference.metrics import chosen_nll
from prefopt.reward.loss import bradley_terry_loss
from prefopt.simpo.loss import orpo_loss, simpo_loss


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
    """beta 2, gamma/beta 0.5 (gamma = 1). Summed logps (-1, -3) / (-3, -2) over lengths (2, 3) / (2, 2): averages
    pair 1 (-0.5, -1.5), pair 2 (-1, -1). beta*(avg_w - avg_l - 0.5) = 2*(1 - 0.5) = 1 and 2*(0 - 0.5) = -1;
    loss = mean(log(1+e^-1), log(1+e)) = mean(0.31326, 1.31326) = 0.81326. Rewards = 2*avg: chosen mean(-1, -2) =
    -1.5, rejected mean(-3, -2) = -2.5, margins 1.0, accuracies (1, 0) -> 0.5; logps/chosen is the SUM: mean(-1, -3)
    = -2. With sft_weight 0.5: token-level NLL = (1 + 3) / (2 + 3) = 0.8, loss 0.81326 + 0.4 = 1.21326 (a mean of
    per-sequence means would give (0.5 + 1) / 2 = 0.75 instead)."""
    c, r = torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -2.0])
    lc, lr = torch.tensor([2.0, 3.0]), torch.tensor([2.0, 2.0])
    loss, m = simpo_loss(c, r, lc, lr, beta=2.0, gamma_beta_ratio=0.5)
    assert_close(loss, torch.tensor(0.81326), atol=1e-5, rtol=0)
    assert_close(m["rewards/chosen"], torch.tensor(-1.5))
    assert_close(m["rewards/rejected"], torch.tensor(-2.5))
    assert_close(m["rewards/margins"], torch.tensor(1.0))
    assert_close(m["rewards/accuracies"], torch.tensor(0.5))
    assert_close(m["logps/chosen"], torch.tensor(-2.0))
    assert_close(m["logps_per_token/chosen"], torch.tensor(-0.75))
    assert_close(m["length/chosen"], torch.tensor(2.5))
    loss_sft, m = simpo_loss(c, r, lc, lr, 2.0, 0.5, sft_weight=0.5)
    assert_close(loss_sft, torch.tensor(1.21326), atol=1e-5, rtol=0)
    assert_close(m["nll"], torch.tensor(0.8))


def test_simpo_margin_lowers_loss_and_gamma_raises_it():
    c, r, n = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([1.0])
    base = simpo_loss(c, r, n, n, 2.0, 0.5)[0]
    assert simpo_loss(c + 0.5, r, n, n, 2.0, 0.5)[0] < base
    assert simpo_loss(c, r, n, n, 2.0, 1.0)[0] > base


def test_chosen_nll_is_token_level():
    """Summed logps (-2, -9) over lengths (1, 3): token-level (2 + 9) / 4 = 2.75 (per-sequence means: 2.5)."""
    assert_close(chosen_nll(torch.tensor([-2.0, -9.0]), torch.tensor([1.0, 3.0])), torch.tensor(2.75))


def test_rpo_term_and_ipo_per_token_hand_computed():
    """DPO sigmoid (beta 0.5, loss 0.64367 above) + 1.0 * token-level NLL of chosen logps (-1, -2) over lengths (1, 3):
    3 / 4 = 0.75 -> 1.39367. IPO per token, tau 0.25 (1/(2 tau) = 2), lengths chosen (1, 3), rejected (2, 1):
    log-ratios chosen (+1, 0) / (1, 3) = (1, 0), rejected (-1, +1) / (2, 1) = (-0.5, 1); h = (1.5, -1);
    ((1.5-2)^2 + (-1-2)^2) / 2 = (0.25 + 9) / 2 = 4.625."""
    lc, lr = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])
    loss, m = dpo_loss(PI_C, PI_R, REF_C, REF_R, 0.5, chosen_lengths=lc, rejected_lengths=lr, sft_weight=1.0)
    assert_close(loss, torch.tensor(0.64367 + 0.75), atol=1e-5, rtol=0)
    loss, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, 0.25, "ipo", chosen_lengths=lc, rejected_lengths=lr,
                       ipo_per_token=True)
    assert_close(loss, torch.tensor(4.625))


def test_orpo_hand_computed():
    """lambda (beta) 0.5. Summed logps chosen -1 over 2 tokens, rejected -3 over 3: averages -0.5 and -1.
    log odds = avg - log(1 - e^avg): chosen -0.5 - log(1 - 0.60653) = -0.5 + 0.93275 = 0.43275;
    rejected -1 - log(1 - 0.36788) = -1 + 0.45868 = -0.54132; difference 0.97407.
    -log sigma(0.97407) = log(1 + e^-0.97407) = log(1.37757) = 0.32030; NLL = 1 / 2 = 0.5; loss = 0.5 + 0.5 * 0.32030
    = 0.66015."""
    loss, m = orpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([2.0]), torch.tensor([3.0]), 0.5)
    assert_close(m["log_odds_ratio"], torch.tensor(0.97407), atol=1e-5, rtol=0)
    assert_close(loss, torch.tensor(0.66015), atol=1e-5, rtol=0)


def test_bradley_terry_hand_computed():
    """Rewards chosen (2, 0), rejected (1, 1): differences (1, -1); loss = mean(log(1+e^-1), log(1+e)) = 0.81326;
    with margin (1, 0): (0, -1) -> mean(log 2, log(1+e)) = mean(0.69315, 1.31326) = 1.00320. accuracies 0.5."""
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, m = bradley_terry_loss(c, r)
    assert_close(loss, torch.tensor(0.81326), atol=1e-5, rtol=0)
    assert_close(m["rewards/accuracies"], torch.tensor(0.5))
    assert_close(m["rewards/margins"], torch.tensor(0.0))
    assert_close(bradley_terry_loss(c, r, margin=torch.tensor([1.0, 0.0]))[0], torch.tensor(1.00320), atol=1e-5,
                 rtol=0)


def test_ppo_loss_hand_computed():
    """Two response tokens and one padding position (mask 1, 1, 0); eps = eps_v = 0.2, vf_coef 0.1.
    Policy, old log-probs 0, ratios r = (1.5, 0.9, 3), advantages A = (1, -1, 5):
      token 1: max(-1 * 1.5, -1 * clip(1.5) = -1.2) = -1.2   (clipped: counts in clipfrac)
      token 2: max( 1 * 0.9,   1 * clip(0.9) =  0.9) =  0.9
      L^CLIP = (-1.2 + 0.9) / 2 = -0.15; clipfrac 1/2; ratio (1.5 + 0.9) / 2 = 1.2; padding (r = 3, A = 5) ignored.
    Value, V_old = (0, 1, 0), V = (0.5, 1.1, 9), returns R = (1, 0, 7):
      token 1: (0.5 - 1)^2 = 0.25; V_clip = 0 + clip(0.5, -0.2, 0.2) = 0.2, (0.2 - 1)^2 = 0.64 -> 0.64 (clipped)
      token 2: (1.1 - 0)^2 = 1.21; V_clip = 1 + 0.1 = 1.1 -> 1.21 (equal: not clipped)
      L^VF = 0.5 * (0.64 + 1.21) / 2 = 0.4625; value/clipfrac 1/2.
    L = -0.15 + 0.1 * 0.4625 = -0.10375."""
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logps = torch.log(torch.tensor([[1.5, 0.9, 3.0]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    values = torch.tensor([[0.5, 1.1, 9.0]], requires_grad=True)
    old_values, returns = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 7.0]])
    loss, m = ppo_loss(logps, torch.zeros(1, 3), adv, values, old_values, returns, mask, cliprange=0.2,
                       cliprange_value=0.2, vf_coef=0.1)
    assert_close(loss, torch.tensor(-0.10375))
    assert_close(m["loss/policy"], torch.tensor(-0.15))
    assert_close(m["loss/value"], torch.tensor(0.4625))
    assert_close(m["clipfrac"], torch.tensor(0.5))
    assert_close(m["ratio"], torch.tensor(1.2))
    assert_close(m["approx_kl"], torch.tensor(0.5 * (math.log(1.5) ** 2 + math.log(0.9) ** 2) / 2))
    assert_close(m["value/clipfrac"], torch.tensor(0.5))
    assert not any(v.requires_grad for v in m.values())
    loss.backward()
    # Only the unclipped tokens carry gradient: d/dlogp of r * -A / 2 at token 2 is 0.9 * 1 / 2 = 0.45; token 1 is
    # clipped (0); d/dV at token 2 is 0.1 * 0.5 * 2 * (1.1 - 0) / 2 = 0.055, token 1's clipped value term gives 0.
    assert_close(logps.grad, torch.tensor([[0.0, 0.45, 0.0]]))
    assert_close(values.grad, torch.tensor([[0.0, 0.055, 0.0]]))


@pytest.mark.parametrize("kwargs,match", [({"beta": 0.0}, "beta"), ({"beta": -1.0}, "beta"),
                                          ({"label_smoothing": 0.5}, "label_smoothing"),
                                          ({"loss_type": "hinge"}, "hinge")])
def test_dpo_bad_input_named(kwargs, match):
    args = {"beta": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, **args)


def test_simpo_bad_input_named():
    n = torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match="gamma_beta_ratio"):
        simpo_loss(PI_C, PI_R, n, n, 2.0, -0.1)
    with pytest.raises(ValueError, match="beta"):
        orpo_loss(PI_C, PI_R, n, n, 0.0)


# ------------------------------------------------------------------------------------------ against TRL
# TRL is the oracle, not the engine: on the same pairs its trainers' losses equal ours computed by our own forward.

TRL_LOSS = {  # our objective -> TRL 1.16 DPOConfig fields giving the same objective
    "sigmoid": {"loss_type": ["sigmoid"]},
    "ipo": {"loss_type": ["ipo"]},  # TRL's IPO is the per-token form (our ipo_per_token=True)
    # TRL's "sigmoid" ignores label_smoothing; with A = logsigma(bh), B = logsigma(-bh): robust =
    # (-(1-e)A + eB) / (1-2e), so cDPO = -(1-e)A - eB = 2(1-e) sigmoid - (1-2e) robust
    "cdpo": {"loss_type": ["sigmoid", "robust"], "loss_weights": [2 * 0.8, -(1 - 0.4)], "label_smoothing": 0.2},
    "sigmoid+nll": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]},
}


def _rows():
    from prefopt.data.templates import alpaca_prompt

    # very different prompt and completion lengths, so padding, packing and length normalisation all matter
    return [{"prompt": alpaca_prompt("Sort the numbers in ascending order.", "3 1 2"), "chosen": "1 2 3",
             "rejected": "3 2 1 0 0 0 0 0 0"},
            {"prompt": alpaca_prompt("Say hello."), "chosen": "hello there, how can I help you today?",
             "rejected": "the"},
            {"prompt": alpaca_prompt("Sort 9 8 7 6 5 4 3 2 1 0, then say what the quick brown fox does."),
             "chosen": "0 1 2 3 4 5 6 7 8 9. It jumps over the lazy dog.", "rejected": "9 8 7"}]


@pytest.fixture(scope="module")
def trl_setup(tiny_model_dir):
    """Policy = the tiny model; reference = another random init, so the log-ratios are far from 0."""
    from prefopt.models.loading import build_tiny_llama, load_tokenizer
    from prefopt.dist.process import seed_everything

    tok = load_tokenizer(str(tiny_model_dir))
    seed_everything(1)
    ref = build_tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=64).eval()
    return tok, ref, _rows()


def _trl_dpo(policy_dir, ref_model, rows, tmp_path, loss: dict):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from prefopt.models.loading import load_causal_lm, load_tokenizer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", beta=0.5, max_length=512, bf16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=len(rows), use_cpu=True, **loss)
    return DPOTrainer(model=load_causal_lm(str(policy_dir), "float32"), ref_model=ref_model, args=args,
                      train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(str(policy_dir)))


def _our_logps(model, tok, rows, layout="shared_prompt"):
    """Summed log-probs and lengths from our tokenization, collate and forward (the training path, default layout)."""
    from prefopt.preference.batching import collate
    from prefopt.training.forward import pair_logps
    from prefopt.preference.loop import PairLogps
    from prefopt.preference.data import tokenize_pairs

    sums, lengths = pair_logps(model, collate(tokenize_pairs(rows, tok, 512), tok.pad_token_id, 512, layout))
    return PairLogps.split(sums, lengths)


@pytest.mark.parametrize("name", list(TRL_LOSS))
def test_dpo_objectives_match_trl(trl_setup, tiny_model_dir, tmp_path, name):
    """TRL's DPOTrainer.compute_loss on one batch of 3 pairs equals dpo_loss on log-probs from our own tokenization
    and forward, to 1e-5; and our token ids are TRL's, exactly."""
    from prefopt.preference.batching import collate
    from prefopt.preference.data import tokenize_pairs

    tok, ref, rows = trl_setup
    trainer = _trl_dpo(tiny_model_dir, ref, rows, tmp_path, TRL_LOSS[name])
    batch = next(iter(trainer.get_train_dataloader()))
    # TRL's dataloader may shuffle: map its rows back to ours by the token ids
    ours = collate(tokenize_pairs(rows, tok, 512), tok.pad_token_id, 512, "padded")
    n = len(rows)
    order = [next(j for j in range(n) if torch.equal(
        ours["input_ids"][j][ours["attention_mask"][j].bool()], batch["input_ids"][i][batch["attention_mask"][i].bool()]))
        for i in range(n)]
    idx = torch.tensor(order + [o + n for o in order])
    for k in ("input_ids", "attention_mask"):
        assert torch.equal(ours[k][idx], batch[k]), k
    trainer.model.eval()
    with torch.no_grad():
        trl_value = trainer.compute_loss(trainer.model, batch)
        pi, rf = _our_logps(trainer.model, tok, rows), _our_logps(ref, tok, rows)
    kw = {"sigmoid": {}, "ipo": {"loss_type": "ipo", "ipo_per_token": True},
          "cdpo": {"loss_type": "cdpo", "label_smoothing": 0.2}, "sigmoid+nll": {"sft_weight": 0.7}}[name]
    mine, _ = dpo_loss(pi.chosen, pi.rejected, rf.chosen, rf.rejected, 0.5, chosen_lengths=pi.chosen_lengths,
                       rejected_lengths=pi.rejected_lengths, **kw)
    assert abs(mine.item() - math.log(2)) > 1e-3  # a non-trivial point, not the h = 0 start
    assert_close(trl_value, mine, atol=1e-5, rtol=1e-5)


def _cpo_batch_logps(model, batch):
    """Summed log-probs and lengths of TRL CPO/ORPO's own batch (labels -100 off the completion), chosen then
    rejected: TRL tokenizes these trainers differently from DPO, so the oracle is the loss on the same tokens."""
    out = []
    for side in ("chosen", "rejected"):
        logits = model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]).logits
        labels = batch[f"{side}_labels"][:, 1:]
        mask = labels != -100
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out += [(logp * mask).sum(-1), mask.sum(-1).float()]
    return out  # chosen sums, chosen lengths, rejected sums, rejected lengths


@pytest.mark.parametrize("loss_type,sft_weight", [("simpo", 0.0), ("simpo", 0.7), ("orpo", 0.0)])
def test_reference_free_objectives_match_trl(trl_setup, tiny_model_dir, tmp_path, loss_type, sft_weight):
    """SimPO against TRL's CPOTrainer(loss_type="simpo", cpo_alpha = our sft_weight: its NLL is token-level too), and
    ORPO against TRL's ORPOTrainer, on their batches: same loss to 1e-5. TRL's ORPO takes its NLL over prompt and
    response; ours (the paper's L_SFT on y_w) over the response only, so for ORPO the odds-ratio terms are compared,
    loss minus each side's own NLL."""
    from datasets import Dataset

    from prefopt.models.loading import load_causal_lm

    tok, _, rows = trl_setup
    model = load_causal_lm(str(tiny_model_dir), "float32").eval()
    common = dict(output_dir=str(tmp_path / "trl"), report_to="none", max_length=512, bf16=False, use_cpu=True,
                  per_device_train_batch_size=len(rows))
    if loss_type == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=sft_weight, **common)
        trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=model, args=ORPOConfig(beta=0.3, **common), train_dataset=Dataset.from_list(rows),
                              processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_value, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        c, lc, r, lr = _cpo_batch_logps(trainer.model, batch)
    if loss_type == "simpo":
        mine, _ = simpo_loss(c, r, lc, lr, beta=2.0, gamma_beta_ratio=0.5, sft_weight=sft_weight)
    else:
        mine, m = orpo_loss(c, r, lc, lr, beta=0.3)
        assert_close(m["log_odds_ratio"], torch.as_tensor(trl_metrics["log_odds_chosen"]).float(), atol=1e-5,
                     rtol=1e-5)  # TRL names log sigma(log odds) "log_odds_ratio" and the log odds "log_odds_chosen"
        trl_value, mine = trl_value - trl_metrics["nll_loss"], mine - m["nll"]
    assert_close(torch.as_tensor(trl_value).float(), mine, atol=1e-5, rtol=1e-5)
