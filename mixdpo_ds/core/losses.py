"""Mix-DPO / MoE-DPO losses: every formula of docs/math.md §2–§5 and §10 as pure tensor functions.

Paper: "Mix- and MoE-DPO: A Variational Inference Approach to Direct Preference Optimization"
(Bohne, Polak et al.; docs/math.md). Equation numbers are the paper's.

Symbols (shapes):
    B pairs, K experts; ± = chosen / rejected (index 0 / 1 of the middle axis)
    policy_logps  lp_ik±   (B, 2, K)   sequence log-probs of expert k (response tokens only)
    ref_logps     rp_ik±   (B, 2) or (B, 2, K)
    log_w         log w_ik (B, K)      gate log-weights (log_softmax of logits); (K,) broadcasts
    h_ik±  = β (lp − rp)                                   implicit reward (eq. 10, log Z_k = 0)
    Δ_ik   = h_ik+ − h_ik−                                 expert margin
    R_i±   = logsumexp_k(log w_ik + h_ik±), ΔR_i = R+ − R−  mixture reward (eq. 2)
    m_ik   = Δ_ik + c · sg(Δ_ik − ΔR_i)                     corrected margin (eq. 7, 11; c ∈ {0, 1})
    log σ_ik = logsigmoid(m_ik)                            per-expert BT log-likelihood (eq. 4)
    q_ik   = softmax_k((λ_w log w_ik + log σ_ik) / α)      E-step (Thm. 1, Lemma 6), no gradient

All math runs in fp32 (float64 inputs stay float64, so gradcheck works); bf16 inputs are upcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mixdpo_ds.core.gumbel import GumbelConfig, gumbel_mc_loss
from mixdpo_ds.core.rankings import ranking_policy_loss, ranking_terms

__all__ = [
    "EStepWeights", "GumbelConfig", "MixDPOOutput", "implicit_rewards", "expert_margins", "mixture_rewards",
    "corrected_margins", "bt_loglik", "e_step_temperature", "e_step", "policy_loss", "gate_loss",
    "mix_weight_update", "dpo_loss", "mixdpo_loss", "batch_metrics", "kl_to_uniform", "chosen_nll",
]


def _fp(x: Tensor) -> Tensor:
    """fp32 view of x for the math; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class EStepWeights:
    """Regularised E-step weights of Lemma 6 (``em.estep.*``). Defaults give the exact posterior."""

    lambda_w: float = field(default=1.0, metadata={"help": "λ_KL_w: weight of −KL(q ‖ w); 1 = exact Bayes."})
    lambda_ent: float = field(default=0.0, metadata={"help": "λ_ent: reward for high entropy H(q) (exploration)."})
    lambda_conf: float = field(default=0.0, metadata={"help": "λ_conf: penalty on H(q) (confident experts)."})
    lambda_unif: float = field(default=0.0, metadata={"help": "λ_KL_unif: weight of −KL(q ‖ Uniform)."})

    def __post_init__(self):
        for key in ("lambda_w", "lambda_ent", "lambda_conf", "lambda_unif"):
            if getattr(self, key) < 0:
                raise ValueError(f"em.estep.{key} must be >= 0, got {getattr(self, key)!r}")
        e_step_temperature(self.lambda_w, self.lambda_ent, self.lambda_conf, self.lambda_unif)

    @property
    def alpha(self) -> float:
        return e_step_temperature(self.lambda_w, self.lambda_ent, self.lambda_conf, self.lambda_unif)


@dataclass
class MixDPOOutput:
    """Everything `mixdpo_loss` computes. Tensors of shape (B, K) / (B,) are per pair."""

    loss: Tensor  # scalar, policy_loss + gate_loss
    policy_loss: Tensor  # scalar
    gate_loss: Tensor  # scalar
    resp: Tensor  # (B, K) q_ik (exact) or mean_l z^(l) (gumbel), detached
    log_sigma: Tensor  # (B, K) logsigmoid(m_ik)
    margins: Tensor  # (B, K) Δ_ik
    corrected_margins: Tensor  # (B, K) m_ik
    mixture_margin: Tensor  # (B,) ΔR_i
    loglik: Tensor  # (B,) eq. 5, logsumexp_k(log w + log σ)
    elbo: Tensor  # (B,) Σ_k q (log w + log σ − log q)
    metrics: dict[str, Tensor]  # scalar tensors, not .item()'d


# ----------------------------------------------------------------------------- rewards and margins


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float | Tensor) -> Tensor:
    """h_ik± = β (lp_ik± − rp_ik±)  (eq. 10 with log Z_k(x) = 0, docs/math.md §2.1).

    policy_logps: (B, 2, K); ref_logps: (B, 2) shared reference or (B, 2, K). Returns (B, 2, K).
    """
    ref = _fp(ref_logps)
    if ref.dim() == 2:
        ref = ref.unsqueeze(-1)
    return beta * (_fp(policy_logps) - ref)


def expert_margins(rewards: Tensor) -> Tensor:
    """Δ_ik = h_ik+ − h_ik−. rewards: (B, 2, K) → (B, K)."""
    return rewards[:, 0] - rewards[:, 1]


def mixture_rewards(rewards: Tensor, log_w: Tensor) -> Tensor:
    """R_i± = logsumexp_k(log w_ik + h_ik±)  (eq. 2). rewards (B, 2, K), log_w (B, K) or (K,) → (B, 2)."""
    return torch.logsumexp(_fp(log_w).unsqueeze(-2) + rewards, dim=-1)


def corrected_margins(margins: Tensor, mixture_margin: Tensor, posterior_correction: int | float) -> Tensor:
    """m_ik = Δ_ik + c · sg(Δ_ik − ΔR_i)  (eq. 7 and 11, D.2).

    log q^(r)_k(y+) − log q^(r)_k(y−) = Δ_k − ΔR, so A+/(A+ + A−) of eq. 11 is sigmoid(m_k) with c = 1;
    D.2 differentiates with q^(r) held fixed, hence the stop-gradient. margins (B, K), mixture_margin (B,).
    """
    if posterior_correction == 0:
        return margins
    return margins + posterior_correction * (margins - mixture_margin.unsqueeze(-1)).detach()


def bt_loglik(margins: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-expert Bradley-Terry log-likelihood (eq. 4), optionally label-smoothed (conservative DPO).

    (1 − ε) logsigmoid(m) + ε logsigmoid(−m); ε = 0 gives log σ = logsigmoid(m). Same shape as margins.
    """
    if label_smoothing == 0:
        return F.logsigmoid(margins)
    return (1 - label_smoothing) * F.logsigmoid(margins) + label_smoothing * F.logsigmoid(-margins)


# ----------------------------------------------------------------------------- E-step


def e_step_temperature(lambda_w: float = 1.0, lambda_ent: float = 0.0, lambda_conf: float = 0.0,
                       lambda_unif: float = 0.0) -> float:
    """Effective temperature α of the regularised E-step (Lemma 6).

    α = λ_ent − λ_conf + λ_unif + λ_w.
    NOTE: the paper prints α = λ_conf − λ_ent + λ_unif + λ_w, but expanding Lemma 6's own
    objective, Σ q ℓ + λ_ent H(q) − λ_conf H(q) − λ_unif KL(q‖U) − λ_w KL(q‖w)
      = Σ q (ℓ + λ_w log w) + (λ_ent − λ_conf + λ_unif + λ_w) H(q) + const,
    whose maximiser on the simplex is softmax((ℓ + λ_w log w) / α) with the α above (λ_ent raises
    the temperature, λ_conf lowers it, as E.1 says they should). tests/unit/test_em.py checks the
    closed form against a brute-force maximiser of that objective.
    α ≤ 0 makes the objective convex in q; its maximiser is a vertex, not a softmax, so it is rejected.
    """
    alpha = lambda_ent - lambda_conf + lambda_unif + lambda_w
    if not alpha > 0:
        raise ValueError(
            "E-step temperature α = lambda_ent − lambda_conf + lambda_unif + lambda_w must be > 0, got "
            f"{alpha} (lambda_w={lambda_w}, lambda_ent={lambda_ent}, lambda_conf={lambda_conf}, "
            f"lambda_unif={lambda_unif}); lower lambda_conf or raise lambda_w / lambda_ent / lambda_unif"
        )
    return float(alpha)


@torch.no_grad()
def e_step(log_w: Tensor, log_sigma: Tensor, lambda_w: float = 1.0, lambda_ent: float = 0.0,
           lambda_conf: float = 0.0, lambda_unif: float = 0.0) -> Tensor:
    """Responsibilities q_ik = softmax_k((λ_w log w_ik + log σ_ik) / α)  (Thm. 1, Alg. 2, Lemma 6).

    log_w: (B, K) or (K,); log_sigma: (B, K). Returns (B, K), no gradient. Defaults: exact posterior
    q_k ∝ w_k σ_k.
    """
    alpha = e_step_temperature(lambda_w, lambda_ent, lambda_conf, lambda_unif)
    return torch.softmax((lambda_w * _fp(log_w) + _fp(log_sigma)) / alpha, dim=-1)


# ----------------------------------------------------------------------------- M-step losses


def policy_loss(corrected: Tensor, resp: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """L_policy = −(1/B) Σ_i Σ_k q_ik · [(1 − ε) logsigmoid(m_ik) + ε logsigmoid(−m_ik)]  (eq. 11, D.2).

    corrected: (B, K) corrected margins m; resp: (B, K) held fixed. Returns a scalar.
    """
    return -(resp.detach() * bt_loglik(corrected, label_smoothing)).sum(-1).mean()


def kl_to_uniform(w: Tensor) -> Tensor:
    """KL(w ‖ U) = Σ_k w_k (log w_k + log K) of one weight vector w (K,); 0 · log 0 = 0.

    Example: w = (0.5, 0.5, 0) → 0.5·log(1.5) · 2 = log 1.5 = 0.4055.
    """
    K = w.shape[-1]
    return torch.where(w > 0, w * (w.clamp_min(torch.finfo(w.dtype).tiny).log() + math.log(K)), 0.0).sum()


def _kl_to_uniform_of_mean(log_w: Tensor) -> Tensor:
    """KL(w̄ ‖ U) with w̄ = mean_i w_i, computed from log w̄ = logsumexp_i log w_i − log B (finite at w → 0)."""
    B, K = log_w.shape
    log_wbar = torch.logsumexp(log_w, dim=0) - math.log(B)
    return (log_wbar.exp() * (log_wbar + math.log(K))).sum()


def gate_loss(log_w: Tensor, resp: Tensor, lambda_global: float = 0.0) -> Tensor:
    """L_gate = −(1/B) Σ_i Σ_k q_ik log w_ik + λ_global · KL(w̄ ‖ U)  (eq. 12, D.4; E.1 λ_KL_w_global).

    log_w: (B, K) (or (K,), broadcast over the batch of resp); resp: (B, K). Returns a scalar.
    """
    log_w = _fp(log_w).expand_as(resp)
    loss = -(resp.detach() * log_w).sum(-1).mean()
    if lambda_global:
        loss = loss + lambda_global * _kl_to_uniform_of_mean(log_w)
    return loss


def chosen_nll(policy_logps: Tensor, chosen_tokens: Tensor, resp: Tensor) -> Tensor:
    """RPO's NLL term for K experts: mean_i Σ_k q_ik · (−log π_k(y+_i | x_i) / |y+_i|).

    policy_logps (B, 2, K) summed response log-probs (index 0 = chosen); chosen_tokens (B,) response tokens of each
    chosen row; resp (B, K) responsibilities (held fixed, as in the policy loss). K = 1, q = 1 is TRL's
    `rpo_alpha` term (Pang et al. 2024): the chosen response's mean per-token NLL. Each expert is pulled towards the
    chosen responses of the pairs it is responsible for, which keeps its samples near the data (DPO alone may move
    probability to sequences that appear in neither side, e.g. never emitting end-of-sequence).

    Example: logps chosen = [[−4, −8]], 2 tokens, q = [[0.25, 0.75]] → 0.25·2 + 0.75·4 = 3.5.
    """
    nll = -_fp(policy_logps[:, 0, :]) / chosen_tokens.clamp(min=1).to(torch.float32)[:, None]
    return (resp.detach().to(nll.dtype) * nll).sum(1).mean()


@torch.no_grad()
def mix_weight_update(w: Tensor, resp: Tensor, rho: float = 1.0, w_min: float = 1e-3) -> Tensor:
    """Mix-DPO closed-form prior update (D.4): w ← normalise((1 − ρ) w + ρ mean_i q_i), floored at w_min.

    w: (K,); resp: (B, K). ρ = 1 is the paper's minibatch replacement; ρ < 1 a running average.
    The floor is exact: floored entries are set to w_min and the rest rescaled (ratios kept) to fill
    1 − (#floored)·w_min, repeated until no entry is below w_min. Returns (K,) summing to 1.
    """
    K = w.shape[-1]
    if not 0 < rho <= 1:
        raise ValueError(f"gate.rho must be in (0, 1], got {rho!r}")
    if not 0 <= w_min * K < 1:
        raise ValueError(f"gate.w_min must be in [0, 1/K) = [0, {1 / K:.4g}), got {w_min!r}")
    new = (1 - rho) * _fp(w) + rho * _fp(resp).mean(0)
    new = new / new.sum()
    floored = torch.zeros_like(new, dtype=torch.bool)
    for _ in range(K):
        low = (new < w_min) & ~floored
        if not low.any():
            break
        floored |= low
        free = new.masked_fill(floored, 0.0)
        new = torch.where(floored, torch.full_like(new, w_min), free * (1 - w_min * floored.sum()) / free.sum())
    return new


# ----------------------------------------------------------------------------- DPO (K = 1)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's sigmoid DPO loss (Rafailov et al. 2023; cDPO label smoothing).

    All inputs (B,). logits = (lp+ − lp−) − (rp+ − rp−);
    loss = mean_i[−(1 − ε) logsigmoid(β logits) − ε logsigmoid(−β logits)]  (a scalar, the batch mean);
    chosen/rejected rewards = β (lp± − rp±), detached, (B,).
    """
    pc, pr, rc, rr = (_fp(t) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                       ref_rejected_logps))
    logits = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses.mean(), (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


# ----------------------------------------------------------------------------- Mix-DPO


def mixdpo_loss(
    policy_logps: Tensor, ref_logps: Tensor, log_w: Tensor, beta: float, posterior_correction: int = 1,
    label_smoothing: float = 0.0, estep: EStepWeights | None = None, lambda_global: float = 0.0,
    resp: Tensor | None = None, mode: str = "exact", gumbel: GumbelConfig | None = None,
    noise: Tensor | None = None, generator: torch.Generator | None = None, tau: float | None = None,
) -> MixDPOOutput:
    """The whole of docs/math.md §2–§6 (and §15 for rankings) for one batch.

    policy_logps: (B, 2, K); ref_logps: (B, 2) or (B, 2, K); log_w: (B, K) or (K,) gate log-weights.
    Rankings: policy_logps (B, m, K), ref_logps (B, m[, K]) with m > 2 responses in ranked order (index 0 best):
        log σ is the Plackett–Luce log-likelihood of the ranking (eq. 15.1), everything else is unchanged;
        margins are best-vs-worst; label smoothing is for pairs only.
    mode "exact": resp = E-step posterior (or the given ``resp``, e.g. Dirichlet warm-up, used as is);
        loss = L_policy (eq. 11) + L_gate (eq. 12 + λ_global KL(w̄‖U)). A given ``resp`` takes this path
        in either mode: random warm-up responsibilities override the relaxation too.
    mode "gumbel": z^(l) replaces q (E.2); policy_loss = L_MC likelihood part, whose gradient also
        reaches the gate through z; gate_loss = λ_kl · KL̂(z‖w) + λ_global KL(w̄‖U). ``noise`` (L, B, K)
        or ``generator`` give the Gumbel samples; ``tau`` overrides ``gumbel.tau`` (annealing).
    Reward metrics for K > 1 are resp-weighted: rewards/chosen = mean_i Σ_k q_ik h_ik+ (the reward of the
    experts held responsible for the pair; for K = 1 they equal TRL's). Accuracies: `batch_metrics`.
    """
    _check_loss_args(policy_logps, posterior_correction, mode, label_smoothing)
    estep = estep or EStepWeights()
    B, m, K = policy_logps.shape
    log_w = _fp(log_w).expand(B, K)

    rewards = implicit_rewards(policy_logps, ref_logps, beta)  # (B, m, K)
    mixture = mixture_rewards(rewards, log_w)  # (B, m)
    if m == 2:  # pairs: eq. 4 (the m = 2 case of eq. 15.1, kept as is)
        margins = expert_margins(rewards)  # (B, K)
        mixture_margin = mixture[:, 0] - mixture[:, 1]  # (B,)
        corrected = corrected_margins(margins, mixture_margin, posterior_correction)  # (B, K)
        log_sigma = bt_loglik(corrected)  # (B, K)
    else:  # rankings: Plackett–Luce (docs/math.md §15); margins are best-vs-worst
        margins, mixture_margin, corrected, log_sigma = ranking_terms(rewards, mixture, posterior_correction)

    if mode == "exact" or resp is not None:
        if resp is not None and resp.shape != (B, K):
            raise ValueError(f"resp must have shape (B, K) = ({B}, {K}), got {tuple(resp.shape)}")
        if resp is None:
            resp = e_step(log_w, log_sigma, estep.lambda_w, estep.lambda_ent, estep.lambda_conf, estep.lambda_unif)
        resp = _fp(resp).detach()
        pol = policy_loss(corrected, resp, label_smoothing) if m == 2 else ranking_policy_loss(log_sigma, resp)
        gate = gate_loss(log_w, resp, lambda_global)
    else:
        gumbel = gumbel or GumbelConfig()
        policy_loglik = bt_loglik(corrected, label_smoothing) if m == 2 else log_sigma
        pol, kl, z = gumbel_mc_loss(log_w, log_sigma, policy_loglik, gumbel, tau=tau, noise=noise, generator=generator)
        gate = gumbel.lambda_kl * kl
        if lambda_global:
            gate = gate + lambda_global * _kl_to_uniform_of_mean(log_w)
        resp = z.detach().mean(0)

    with torch.no_grad():
        loglik = torch.logsumexp(log_w + log_sigma, dim=-1)  # (B,) eq. 5
        elbo = (resp * (log_w + log_sigma) - torch.special.xlogy(resp, resp)).sum(-1)  # (B,)
        metrics = batch_metrics(policy_logps, rewards, margins, log_w, resp, loglik, elbo)
    return MixDPOOutput(
        loss=pol + gate, policy_loss=pol, gate_loss=gate, resp=resp, log_sigma=log_sigma, margins=margins,
        corrected_margins=corrected, mixture_margin=mixture_margin, loglik=loglik, elbo=elbo, metrics=metrics,
    )


def _check_loss_args(policy_logps: Tensor, posterior_correction, mode: str, label_smoothing: float) -> None:
    if posterior_correction not in (0, 1):
        raise ValueError(f"em.posterior_correction must be one of [0, 1], got {posterior_correction!r}")
    if mode not in ("exact", "gumbel"):
        raise ValueError(f"em.mode must be one of ['exact', 'gumbel'], got {mode!r}")
    if policy_logps.dim() != 3 or policy_logps.shape[1] < 2:
        raise ValueError(f"policy_logps must have shape (B, m, K) with m >= 2 responses per item, got "
                         f"{tuple(policy_logps.shape)}")
    if policy_logps.shape[1] > 2 and label_smoothing:
        raise ValueError(f"em.label_smoothing={label_smoothing} is defined for pairs only (conservative DPO flips "
                         f"one pairwise label); ranked data (m = {policy_logps.shape[1]}) needs em.label_smoothing=0")


def _entropy(p: Tensor) -> Tensor:
    """H(p) along the last axis, 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(-1)


def batch_metrics(policy_logps: Tensor, rewards: Tensor, margins: Tensor, log_w: Tensor, resp: Tensor,
                  loglik: Tensor, elbo: Tensor) -> dict[str, Tensor]:
    """Per-batch diagnostics (docs/math.md §10), all scalar tensors, in TRL's names where TRL has the concept.

    policy_logps, rewards (B, m, K) (m = 2: pairs; index −1 is the rejected / worst response); margins, log_w, resp
    (B, K); loglik, elbo (B,).
    `rewards/accuracies` is the mixture's prediction, which does not see the label:
    P_i = Σ_k w_ik σ(Δ_ik) > 0.5 (K = 1: TRL's chosen reward > rejected reward). `rewards/accuracies_posterior`
    uses q, the posterior given the label, and is optimistic: Σ_k q_ik Δ_ik > 0.
    `logps/chosen|rejected` are the gate-weighted sequence log-probs Σ_k w_ik lp_ik±.
    """
    w = log_w.exp()
    p_mixture = (w * torch.sigmoid(margins)).sum(-1)  # (B,)
    chosen = (resp * rewards[:, 0]).sum(-1)  # (B,)
    rejected = (resp * rewards[:, -1]).sum(-1)  # (B,) the last (worst) response; pairs: the rejected one
    metrics = {
        "mbt/loglik": loglik.mean(),
        "elbo": elbo.mean(),
        "resp/entropy": _entropy(resp).mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (p_mixture > 0.5).float().mean(),
        "rewards/accuracies_posterior": (chosen > rejected).float().mean(),
        "logps/chosen": (w * _fp(policy_logps[:, 0])).sum(-1).mean(),
        "logps/rejected": (w * _fp(policy_logps[:, -1])).sum(-1).mean(),
        "gate/entropy": _entropy(w).mean(),
        "p_mixture": p_mixture.mean(),
    }
    for k in range(margins.shape[-1]):
        metrics[f"experts/{k}/margin"] = margins[:, k].mean()
        metrics[f"experts/{k}/accuracy"] = (margins[:, k] > 0).float().mean()
        metrics[f"resp/mean_{k}"] = resp[:, k].mean()
        metrics[f"gate/w_{k}"] = w[:, k].mean()
    return metrics
