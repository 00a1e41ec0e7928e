"""PPO's parts as pure functions: the whole objective (`ppo_loss`: clipped surrogate + vf_coef * clipped value loss),
its two terms, the per-token KL penalty, GAE, KL controllers.

Tensors are (B, T) over positions of a padded batch, with `mask` 1 on response tokens (the actions); every mean
is taken over masked tokens of the whole batch (token-level averaging, as in OpenAI's lm-human-preferences and
TRL). Deviations from the papers, all following Huang et al. 2024 ("The N+ Implementation Details of RLHF with
PPO"): the reward-model score enters only at the last response token; the KL penalty uses the simple estimator
log pi - log pi_ref per token; `approx_kl` is the k2 estimator 0.5 * mean((log r)^2).
"""

from __future__ import annotations

import torch

from prefopt.training.logps import masked_mean, masked_var, masked_whiten

__all__ = [
    "ppo_loss",
    "policy_loss",
    "value_loss",
    "kl_penalty_rewards",
    "gae",
    "whiten",
    "explained_variance",
    "AdaptiveKLController",
    "FixedKLController",
]

whiten = masked_whiten  # (x - mean) / std over response tokens; shift_mean=False keeps the mean (rewards)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", Eq. 7).

        r_t = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t))
        L   = mean_t max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps))

    (Eq. 7 maximises min(r A, clip(r) A); we minimise its negation.) Past 1 +/- eps in the direction the
    advantage pushes, the clipped term wins and the token's gradient is zero.

    Metrics: `clipfrac` (share of tokens where the clipped term is the larger loss), `approx_kl`
    (0.5 * mean((log r)^2), the k2 estimator of KL(pi_old || pi)), `ratio` (mean r).
    """
    log_ratio = (logps - old_logps) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (as in OpenAI baselines' ppo2 and lm-human-preferences; kept by Huang et al. 2024).

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L_V    = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    R_t are the GAE returns A_t + V_old_t. Metrics: `value/clipfrac` (share of tokens where the clipped error is
    the larger one).
    """
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    with torch.no_grad():
        metrics = {"value/clipfrac": masked_mean((err_clipped > err).float(), mask)}
    return loss, metrics


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange: float = 0.2,
             cliprange_value: float = 0.2, vf_coef: float = 0.5) -> tuple[torch.Tensor, dict]:
    """The whole PPO objective the `ppo` stage minimises: the clipped surrogate plus the weighted clipped value loss
    (Schulman et al. 2017, Eq. 9, with a separate value model, so no shared-parameter entropy bonus: c2 = 0).

        r_t   = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t))
        L^CLIP = mean_t max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps))               (Eq. 7, negated)
        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L^VF  = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)       (OpenAI baselines ppo2; Ziegler et al. 2019)
        L     = L^CLIP + c1 * L^VF,   c1 = vf_coef                                        (Eq. 9, negated, c2 = 0)

    Means are over masked (response) tokens. Returns (L, metrics), metrics detached: `loss/policy` (L^CLIP),
    `loss/value` (L^VF), and `policy_loss`'s and `value_loss`'s diagnostics (`clipfrac`, `approx_kl`, `ratio`,
    `value/clipfrac`).
    """
    pg_loss, pg_metrics = policy_loss(logps, old_logps, advantages, mask, cliprange)
    vf_loss, vf_metrics = value_loss(values, old_values, returns, mask, cliprange_value)
    metrics = {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), **pg_metrics, **vf_metrics}
    return pg_loss + vf_coef * vf_loss, metrics


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of each row's last masked position (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * positions).argmax(dim=1)


def kl_penalty_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                       kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with a KL penalty (Ziegler et al. 2019, Eq. 2; Ouyang et al. 2022, Eq. 2).

        r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))        for every response token t
        r_T += score(x, y)                                           at the last response token T

    The sum over t is the paper's R(x, y) = r_theta(x, y) - beta * log(pi(y|x) / pi_ref(y|x)).
    Returns (rewards (B, T), kl (B, T) = log pi - log pi_ref on response tokens).
    """
    mask = mask.to(logps.dtype)
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", Eq. 16), computed right to left:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                       (the value targets)

    V_{t+1} and A_{t+1} are 0 past the last response token (the episode ends there). Positions outside `mask`
    get advantage 0. Returns (advantages, returns), both (B, T).
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = delta + gamma * lam * next_adv
        # A masked position (padding after the response, or the prompt before it) passes nothing leftward
        # from beyond the response: the next step's value and advantage are those of position t if t is masked.
        next_value = values[:, t] * mask[:, t]
        next_adv = advantages[:, t] * mask[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over response tokens: 1 is a perfect value function, 0 no better than a constant."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


class FixedKLController:
    """A constant KL coefficient beta. Its state (checkpointed) is beta itself, for the adaptive one too."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Adapts beta toward a target KL (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
    Sec. 2.2):

        e    = clip(KL / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + K_beta * e),   K_beta = n_steps / horizon

    KL is the mean sequence-level KL of the latest rollout and n_steps the episodes in it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
