"""Few-shot personalisation of a trained mixture and calibration of its margins (docs/math.md §13).

A trained mixture knows K preference modes but not which one a new user holds. Under the model's own generative
story (one latent expert z per user, z ~ w; each of the user's labels ~ Bradley–Terry with expert z's implicit
reward), n labelled pairs of that user give the exact posterior over experts

    q_k ∝ w_k Π_i σ(Δ_ik / T_k),      log q = log_softmax(log w + Σ_i logsigmoid(Δ_i / T))          (§13.1)

which becomes the user's gate weights. T (one temperature, or one per expert) rescales the margins so that σ(Δ/T)
is a calibrated probability (T = 1: the margins as the model gives them). It is fitted on held-out pairs by
maximising the mixture's marginal likelihood (eq. 5 with scaled margins)

    T* = argmin_T  −(1/B) Σ_i log Σ_k w_ik σ(Δ_ik / T_k)                                            (§13.2)

or, when the held-out pairs come with user ids, the evidence of the per-user model itself (one latent expert per
user, the likelihood the posterior is computed under)

    T* = argmin_T  −(1/B) Σ_u log Σ_k w̄_uk Π_{i ∈ u} σ(Δ_ik / T_k)

and the same T is used by the mixture's preference probability P_i = Σ_k w_ik σ(Δ_ik / T_k). Calibration is
reported as the expected calibration error of P (§13.3).

Symbols (shapes): n or B pairs, K experts; margins Δ (n, K) expert margins h_k+ − h_k−; log_w (K,) or (B, K);
temperature a float, (1,) or (K,). K = 1: the posterior is [1] and P = σ(Δ / T) is DPO's preference probability.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["scaled_margins", "user_posterior", "user_log_posterior", "mixture_probability", "mixture_nll",
           "user_mixture_nll", "fit_temperature", "expected_calibration_error", "decision_accuracy"]

T_RANGE = (1e-3, 1e3)  # temperatures outside are clamped: a margin scaled by 1000 is already a hard decision


def _temperature(temperature: float | Tensor, K: int, like: Tensor) -> Tensor:
    """temperature as a (K,) tensor of like's dtype; a scalar or (1,) broadcasts, (K,) is per expert."""
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() not in (1, K):
        raise ValueError(f"temperature has {t.numel()} values: give one, or one per expert (K = {K})")
    if not bool((t > 0).all()):
        raise ValueError(f"temperature must be > 0, got {t.tolist()}")
    return t.expand(K)


def scaled_margins(margins: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Δ / T: margins (..., K), temperature scalar, (1,) or (K,) → (..., K) in fp32 (float64 stays float64)."""
    m = margins if margins.dtype == torch.float64 else margins.float()
    return m / _temperature(temperature, m.shape[-1], m)


def user_posterior(log_w: Tensor, margins: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """q_k ∝ w_k Π_i σ(Δ_ik / T_k): the posterior over experts of one user from n of their pairs (§13.1).

    log_w: (K,) the prior (the mixture weights); margins: (n, K), the expert margins of the user's pairs,
    chosen minus rejected (n = 0: q = w). Returns q (K,) on the simplex. Computed in log space, so a user with
    many pairs does not underflow.
    """
    return user_log_posterior(log_w, margins, temperature).exp()


def user_log_posterior(log_w: Tensor, margins: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """log q (K,) of `user_posterior`, exact where q itself would underflow (a user with many decisive pairs)."""
    if log_w.dim() != 1 or margins.dim() != 2 or margins.shape[1] != log_w.shape[0]:
        raise ValueError(f"user_posterior: log_w (K,) and margins (n, K), got {tuple(log_w.shape)} and "
                         f"{tuple(margins.shape)}")
    m = scaled_margins(margins, temperature)
    lw = log_w.to(m.dtype)
    return torch.log_softmax(lw + F.logsigmoid(m).sum(0), dim=-1)


def mixture_probability(log_w: Tensor, margins: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """P_i = Σ_k w_ik σ(Δ_ik / T_k) = P(chosen ≻ rejected) under the mixture (eq. 2's preference, §13.2).

    log_w (K,) or (B, K), margins (B, K) → (B,). With T = 1 this is `mixdpo evaluate`'s `p_mixture`.
    """
    m = scaled_margins(margins, temperature)
    return (log_w.to(m.dtype).exp() * torch.sigmoid(m)).sum(-1)


def mixture_nll(log_w: Tensor, margins: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """−(1/B) Σ_i log Σ_k w_ik σ(Δ_ik / T_k): the mixture's negative log-likelihood of the labels (eq. 5), scalar."""
    m = scaled_margins(margins, temperature)
    return -torch.logsumexp(log_w.to(m.dtype) + F.logsigmoid(m), dim=-1).mean()


def user_mixture_nll(log_w: Tensor, margins: Tensor, users: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """−(1/B) Σ_u log Σ_k w̄_uk Π_{i ∈ u} σ(Δ_ik / T_k): the labels' NLL with one latent expert per user (§13.2),
    the evidence of `user_posterior`; w̄_u = mean of w_i over user u's pairs. Scalar.

    log_w (K,) or (B, K), margins (B, K), users (B,) long ids in [0, U). With one pair per user it is `mixture_nll`.
    """
    m = scaled_margins(margins, temperature)
    B, K = m.shape
    users = users.long().to(m.device)
    U = int(users.max()) + 1
    w = log_w.to(m.dtype).exp().expand(B, K)
    counts = torch.zeros(U, dtype=m.dtype, device=m.device).index_add_(0, users, torch.ones_like(users, dtype=m.dtype))
    seen = counts > 0
    log_prior = (torch.zeros(U, K, dtype=m.dtype, device=m.device).index_add_(0, users, w)[seen] /
                 counts[seen, None]).log()                                             # (U', K)
    evidence = torch.zeros(U, K, dtype=m.dtype, device=m.device).index_add_(0, users, F.logsigmoid(m))[seen]
    return -torch.logsumexp(log_prior + evidence, dim=-1).sum() / B


def fit_temperature(log_w: Tensor, margins: Tensor, per_expert: bool = False, max_iter: int = 200,
                    users: Tensor | None = None) -> Tensor:
    """T minimising `mixture_nll` on held-out pairs (§13.2): (1,) one temperature, or (K,) with per_expert. With
    `users` (B,) (which pairs share a user), `user_mixture_nll` instead: the likelihood the few-shot posterior uses.

    log_w (K,) or (B, K), margins (B, K). L-BFGS on log T in float64 from T = 1, clamped to [1e-3, 1e3]. Pairs
    are labelled chosen ≻ rejected, so the fit needs some pairs with Δ < 0 (an expert that ranks every held-out
    pair right is best served by T → 0, which the clamp stops).
    """
    if margins.dim() != 2 or margins.shape[0] == 0:
        raise ValueError(f"fit_temperature: margins must be (B, K) with B >= 1, got {tuple(margins.shape)}")
    m = margins.detach().double()
    lw = log_w.detach().double()
    K = m.shape[1]
    log_t = torch.zeros(K if per_expert else 1, dtype=torch.float64, requires_grad=True)
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        t = log_t.clamp(lo, hi).exp()
        loss = mixture_nll(lw, m, t) if users is None else user_mixture_nll(lw, m, users, t)
        loss.backward()
        return loss

    opt.step(closure)
    return log_t.detach().clamp(lo, hi).exp().float()


def decision_accuracy(p_chosen: Tensor) -> Tensor:
    """Per pair: 1 when P(chosen ≻ rejected) > 0.5, 0 when < 0.5, 0.5 on a tie (the demo's scoring). (B,) → (B,)."""
    return torch.where(p_chosen > 0.5, 1.0, torch.where(p_chosen < 0.5, 0.0, 0.5)).to(p_chosen.dtype)


def expected_calibration_error(p_chosen: Tensor, num_bins: int = 10) -> float:
    """Top-label ECE of binary preference probabilities (§13.3).

    Each pair is predicted with confidence c_i = max(P_i, 1 − P_i) ∈ [0.5, 1] and is right when P_i > 0.5 (the
    label is always chosen ≻ rejected; a tie counts 0.5). The confidences fall in `num_bins` equal bins of
    [0.5, 1] (the last bin closed); ECE = Σ_b (n_b / B) |mean acc_b − mean c_b|.
    Example: P = (0.9, 0.8, 0.3, 0.6), 2 bins: [0.5, 0.75) holds c = 0.7, 0.6 with accuracy 0, 1 → |0.5 − 0.65|;
    [0.75, 1] holds 0.9, 0.8, both right → |1 − 0.85|; ECE = ½·0.15 + ½·0.15 = 0.15.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    p = p_chosen.detach().double().reshape(-1)
    if p.numel() == 0:
        raise ValueError("expected_calibration_error: no pairs")
    conf = torch.maximum(p, 1 - p)
    acc = decision_accuracy(p)
    bins = ((conf - 0.5) / 0.5 * num_bins).floor().long().clamp(0, num_bins - 1)  # (B,)
    ece = 0.0
    for b in range(num_bins):
        sel = bins == b
        if sel.any():
            ece += float(sel.double().mean() * (acc[sel].mean() - conf[sel].mean()).abs())
    return ece
