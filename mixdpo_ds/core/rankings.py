"""Rankings of m ≥ 2 responses: the per-expert Plackett–Luce log-likelihood (docs/math.md §15).

A pairwise label cannot say which of three annotator groups produced it when the groups' rules split every pair
2-vs-1; a ranking of m ≥ 3 responses can (Chidambaram et al., EM-DPO). Everything above the per-item, per-expert
log-likelihood log σ_ik (B, K) — the E-step, the policy and gate losses, the Gumbel relaxation — is unchanged; this
module only supplies that log-likelihood for a ranking. `mixdpo_ds.core.losses.mixdpo_loss` calls it whenever the
middle axis of `policy_logps` is longer than 2; m = 2 keeps the pairwise code (eq. 4), which is the same formula.

Symbols (shapes):
    B items, m responses per item in ranked order (index 0 = best), K experts
    h_ikj   implicit reward of response j under expert k        rewards (B, m, K)
    R_ij    = logsumexp_k(log w_ik + h_ikj)                     mixture reward (eq. 2), (B, m)
    h'_ikj  = h_ikj + c · sg(h_ikj − R_ij)                      corrected reward (eq. 7, 11; c ∈ {0, 1})
    log P_ik = Σ_{j=0}^{m-2} [h'_ikj − logsumexp_{l ≥ j} h'_ikl]    Plackett–Luce log-likelihood     (15.1)
    Δ_ik    = h_ik0 − h_ik,m−1                                  best-vs-worst margin (metrics, evaluation)

For m = 2, log P = h'_0 − logsumexp(h'_0, h'_1) = logsigmoid(h'_0 − h'_1) = logsigmoid(m_ik) with
m_ik = Δ_ik + c · sg(Δ_ik − ΔR_i): eq. 4 with the corrected margin of docs/math.md §2.
"""
from __future__ import annotations

from torch import Tensor

__all__ = ["plackett_luce_loglik", "corrected_rewards", "ranking_terms", "ranking_policy_loss"]


def plackett_luce_loglik(rewards: Tensor) -> Tensor:
    """log P(ranking) = Σ_{j=0}^{m-2} [r_j − logsumexp(r_j, …, r_{m-1})]  (docs/math.md eq. 15.1).

    rewards: (B, m, K) in ranked order (index 0 = best) → (B, K). The last position contributes 0 and is left out.
    Gradient (eq. 15.2): ∂ log P / ∂ r_i = 1[i ≤ m−2] − Σ_{j ≤ min(i, m−2)} exp(r_i − logsumexp_{l ≥ j} r_l).
    Example: r = (1, 0, −1) → (1 − log(e + 1 + e⁻¹)) + (0 − log(1 + e⁻¹)) = −0.407606 − 0.313262 = −0.720868.
    """
    if rewards.dim() != 3 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must have shape (B, m, K) with m >= 2, got {tuple(rewards.shape)}")
    suffix_lse = rewards.flip(1).logcumsumexp(1).flip(1)  # (B, m, K): logsumexp_{l >= j} r_l
    return (rewards[:, :-1] - suffix_lse[:, :-1]).sum(1)


def corrected_rewards(rewards: Tensor, mixture: Tensor, posterior_correction: int | float) -> Tensor:
    """h'_ikj = h_ikj + c · sg(h_ikj − R_ij)  (eq. 7 and 11 per response; docs/math.md eq. 15.3).

    log q^(r)_k(y_j) = log w_k + h_kj − R_j; the log w_k part is constant over the item's responses and cancels in
    the Plackett–Luce terms, so this is the pairwise correction m = Δ + c · sg(Δ − ΔR) written per response.
    rewards (B, m, K), mixture (B, m) → (B, m, K).
    """
    if posterior_correction == 0:
        return rewards
    return rewards + posterior_correction * (rewards - mixture.unsqueeze(-1)).detach()


def ranking_terms(rewards: Tensor, mixture: Tensor, posterior_correction: int | float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(margins Δ (B, K), mixture margin ΔR (B,), corrected margins (B, K), log P (B, K)) of ranked items.

    rewards (B, m, K) in ranked order, mixture (B, m). Margins are best-vs-worst: Δ = h_0 − h_{m−1},
    ΔR = R_0 − R_{m−1}; the corrected margin is h'_0 − h'_{m−1}. These three are diagnostics (metrics, evaluation,
    collapse watch); the loss and the E-step use log P.
    """
    corrected = corrected_rewards(rewards, mixture, posterior_correction)  # (B, m, K)
    return (rewards[:, 0] - rewards[:, -1], mixture[:, 0] - mixture[:, -1], corrected[:, 0] - corrected[:, -1],
            plackett_luce_loglik(corrected))


def ranking_policy_loss(loglik: Tensor, resp: Tensor) -> Tensor:
    """L_policy = −(1/B) Σ_i Σ_k q_ik · log P_ik  (eq. 11 with the Plackett–Luce likelihood; docs/math.md eq. 15.5).

    loglik: (B, K) log P of each item under each expert; resp: (B, K) held fixed. Returns a scalar.
    """
    return -(resp.detach() * loglik).sum(-1).mean()
