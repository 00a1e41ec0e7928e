"""PPO's parts on hand-computed values, plus the behaviour the clip must have."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from prefopt.ppo.loss import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_penalty_rewards,
    policy_loss,
    value_loss,
    whiten,
)


def test_policy_loss_hand_computed():
    """ratios r = (1.5, 0.5, 1.0), advantages A = (1, 1, -2), eps = 0.2:
    token 1: max(-1.5, -1.2) = -1.2 (clipped; counts in clipfrac)
    token 2: max(-0.5, -0.8) = -0.5 (below 1 - eps but A > 0: the unclipped term is kept, so it is pessimistic)
    token 3: max( 2.0,  2.0) =  2.0
    loss = (-1.2 - 0.5 + 2.0) / 3 = 0.1; clipfrac = 1/3;
    approx_kl = 0.5 * (ln(1.5)^2 + ln(0.5)^2 + 0) / 3."""
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, m = policy_loss(logps, old, adv, mask, cliprange=0.2)
    assert_close(loss, torch.tensor(0.1))
    assert_close(m["clipfrac"], torch.tensor(1 / 3))
    assert_close(m["approx_kl"], torch.tensor(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3))
    assert_close(m["ratio"], torch.tensor(1.0))


def test_policy_loss_ignores_masked_tokens():
    """The same three tokens plus one masked token with a huge advantage: the loss is still 0.1."""
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.0, 3.0]]))
    adv = torch.tensor([[1.0, 1.0, -2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, _ = policy_loss(logps, old, adv, mask)
    assert_close(loss, torch.tensor(0.1))


def test_clip_engages_past_one_plus_eps():
    """A > 0 and r > 1 + eps: the clipped term is constant, so the token's gradient is exactly zero.
    Below 1 + eps the gradient of -A r / n w.r.t. log pi is -A r / n = -1 * 1.1 / 1."""
    adv, mask, old = torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1, 1)
    clipped = torch.log(torch.tensor([[1.3]])).requires_grad_()
    loss, m = policy_loss(clipped, old, adv, mask, cliprange=0.2)
    loss.backward()
    assert clipped.grad.item() == 0.0
    assert m["clipfrac"].item() == 1.0
    inside = torch.log(torch.tensor([[1.1]])).requires_grad_()
    loss, m = policy_loss(inside, old, adv, mask, cliprange=0.2)
    loss.backward()
    assert_close(inside.grad, torch.tensor([[-1.1]]))
    assert m["clipfrac"].item() == 0.0
    # A < 0 and r < 1 - eps: clipped the other way, gradient zero as well.
    low = torch.log(torch.tensor([[0.7]])).requires_grad_()
    loss, _ = policy_loss(low, old, -adv, mask, cliprange=0.2)
    loss.backward()
    assert low.grad.item() == 0.0


def test_larger_advantage_lowers_loss():
    logps = torch.log(torch.tensor([[1.05, 0.95, 1.0]]))
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    losses = [policy_loss(logps, old, torch.full((1, 3), a), mask)[0].item() for a in (-1.0, 0.0, 0.5, 2.0)]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1]


def test_value_loss_hand_computed():
    """V = (1.0, 0.0, 0.6), V_old = (0.5, 0.5, 0.5), R = (2.0, 0.0, 0.6), eps_v = 0.2:
    V_clip = (0.7, 0.3, 0.6); (V-R)^2 = (1, 0, 0); (V_clip-R)^2 = (1.69, 0.09, 0)
    loss = 0.5 * (1.69 + 0.09 + 0) / 3 = 0.29667; clipfrac = 2/3 (the third token is not clipped)."""
    v = torch.tensor([[1.0, 0.0, 0.6]])
    old = torch.full((1, 3), 0.5)
    ret = torch.tensor([[2.0, 0.0, 0.6]])
    loss, m = value_loss(v, old, ret, torch.ones(1, 3), cliprange_value=0.2)
    assert_close(loss, torch.tensor(0.5 * 1.78 / 3))
    assert_close(m["value/clipfrac"], torch.tensor(2 / 3))


def test_kl_penalty_rewards_hand_computed():
    """Response at positions 1-2 of 4. log pi - log pi_ref = (0.5, -1); beta = 0.1, score 3:
    r = (0, -0.05, 0.1 + 3, 0): the score lands on the last response token only."""
    logps = torch.tensor([[0.0, -1.0, -2.0, -7.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards, kl = kl_penalty_rewards(logps, ref, torch.tensor([3.0]), mask, kl_coef=0.1)
    assert_close(rewards, torch.tensor([[0.0, -0.05, 3.1, 0.0]]))
    assert_close(kl, torch.tensor([[0.0, 0.5, -1.0, 0.0]]))


def test_gae_three_steps_by_hand():
    """r = (0, 0, 1), V = (0.5, 0.6, 0.7), gamma 1, lam 0.5:
    t=2: delta = 1 + 0 - 0.7 = 0.3                A2 = 0.3
    t=1: delta = 0 + 0.7 - 0.6 = 0.1              A1 = 0.1 + 0.5 * 0.3  = 0.25
    t=0: delta = 0 + 0.6 - 0.5 = 0.1              A0 = 0.1 + 0.5 * 0.25 = 0.225
    returns = A + V = (0.725, 0.85, 1.0)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert_close(adv, torch.tensor([[0.225, 0.25, 0.3]]))
    assert_close(ret, torch.tensor([[0.725, 0.85, 1.0]]))


def test_gae_with_discount_and_padding():
    """The same episode placed after a prompt position and before padding, whose values must not leak in.
    gamma 0.9, lam 0.5: t=2: 1 - 0.7 = 0.3; t=1: 0.9*0.7 - 0.6 = 0.03, A1 = 0.03 + 0.45*0.3 = 0.165;
    t=0: 0.9*0.6 - 0.5 = 0.04, A0 = 0.04 + 0.45*0.165 = 0.11425."""
    rewards = torch.tensor([[5.0, 0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[3.0, 0.5, 0.6, 0.7, 8.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert_close(adv, torch.tensor([[0.0, 0.11425, 0.165, 0.3, 0.0]]))
    assert_close(ret, torch.tensor([[0.0, 0.61425, 0.765, 1.0, 0.0]]))


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    # mean 2, unbiased std 1 over the three masked entries
    assert_close(w[:, :3], torch.tensor([[-1.0, 0.0, 1.0]]), atol=1e-4, rtol=0)
    kept = whiten(x, mask, shift_mean=False)
    assert_close(kept[:, :3], torch.tensor([[1.0, 2.0, 3.0]]), atol=1e-4, rtol=0)
    assert_close(explained_variance(x, x, mask), torch.tensor(1.0))
    # V = mean(R): Var(R - V) = Var(R), nothing explained.
    assert_close(explained_variance(torch.full_like(x, 2.0), x, mask), torch.tensor(0.0))


def test_kl_controllers_by_hand():
    """beta 0.1, target 6, horizon 10000, 64 episodes:
    KL 9:   e = clip(9/6 - 1, -0.2, 0.2) = 0.2    -> beta = 0.1 * (1 + 0.2 * 64/10000)   = 0.100128
    KL 5.7: e = 5.7/6 - 1 = -0.05                 -> beta = 0.100128 * (1 - 0.05 * 0.0064)"""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=64)
    assert ctl.value == pytest.approx(0.100128)
    ctl.update(5.7, n_steps=64)
    assert ctl.value == pytest.approx(0.100128 * (1 - 0.05 * 0.0064))
    restored = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=64)
    assert fixed.value == 0.05
