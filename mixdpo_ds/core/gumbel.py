"""Monte Carlo (Gumbel-softmax) relaxation of the expert assignment, paper App. E.2 / F.3.

Replaces the closed-form E-step when ``em.mode = gumbel``: instead of the posterior q_ik, each pair
gets L relaxed one-hot samples z^(l) in the simplex, and the loss is differentiated through them
(reparameterisation, Jang et al. 2017) into the gate.

    z^(l)   = softmax((ℓ + g^(l)) / τ),  g^(l) ~ Gumbel(0, 1),  l = 1..L
    ℓ       = log w + sg(log σ)   (logits = "posterior", the paper's log α_k)   or   log w  ("prior")
    L_MC    = −(1/L) Σ_l Σ_k z_k^(l) log σ_k  +  λ_kl (1/L) Σ_l Σ_k z_k^(l) log(z_k^(l) / w_k)

Symbols: B pairs, K experts, L samples, τ temperature, log σ_ik the per-expert Bradley-Terry
log-likelihood (eq. 4), log w_ik the gate log-weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

GUMBEL_LOGITS = ("posterior", "prior")


@dataclass
class GumbelConfig:
    """Monte Carlo relaxation settings (``em.gumbel.*``)."""

    samples: int = field(default=1, metadata={"help": "L, Gumbel-softmax samples per pair (E.2)."})
    tau: float = field(default=1.0, metadata={"help": "τ_0, initial temperature; F.1 recommends τ > 0.5."})
    logits: str = field(
        default="posterior",
        metadata={"help": "'posterior': ℓ = log w + log σ (the paper's log α_k); 'prior': ℓ = log w."},
    )
    hard: bool = field(default=False, metadata={"help": "Straight-through: one-hot z forward, soft z backward."})
    lambda_kl: float = field(default=0.0, metadata={"help": "λ_kl, weight of the relaxed KL(z ‖ w) term of E.2."})

    def __post_init__(self):
        if int(self.samples) != self.samples or self.samples < 1:
            raise ValueError(f"em.gumbel.samples must be an integer >= 1, got {self.samples!r}")
        self.samples = int(self.samples)
        if not self.tau > 0:
            raise ValueError(f"em.gumbel.tau must be > 0, got {self.tau!r}")
        if self.logits not in GUMBEL_LOGITS:
            raise ValueError(f"em.gumbel.logits must be one of {list(GUMBEL_LOGITS)}, got {self.logits!r}")
        if self.lambda_kl < 0:
            raise ValueError(f"em.gumbel.lambda_kl must be >= 0, got {self.lambda_kl!r}")


def sample_gumbel(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None,
                  dtype=torch.float32) -> Tensor:
    """Standard Gumbel(0, 1) noise of ``shape`` as −log E with E ~ Exp(1).

    −log(E) is Gumbel distributed; E is clamped away from 0 so the noise is always finite.
    """
    e = torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)
    return -torch.log(e.clamp_min(torch.finfo(dtype).tiny))


def gumbel_logits(log_w: Tensor, log_sigma: Tensor, logits: str = "posterior") -> Tensor:
    """Logits ℓ (B, K) of the relaxed assignment.

    For "posterior" the log σ part is detached. Why: the paper writes z as a differentiable function of
    the gate and the noise only (E.2: "a deterministic, differentiable function of w_k(x) and auxiliary
    random noise"; F.3: z ~ RelaxedCategorical(τ, w(x))), and z stands in for the E-step posterior,
    which EM holds fixed in the policy M-step (D.2). Letting the policy gradient also flow through the
    routing would add a winner-take-all path: ∂L_MC/∂ log σ_j through z is −z_j (log σ_j − Σ_k z_k log σ_k)/τ,
    which pushes every below-average expert to fit the pair *worse*, something the EM update never does.
    """
    if logits == "prior":
        return log_w.expand_as(log_sigma)
    if logits == "posterior":
        return log_w + log_sigma.detach()
    raise ValueError(f"em.gumbel.logits must be one of {list(GUMBEL_LOGITS)}, got {logits!r}")


def gumbel_softmax_samples(logits: Tensor, tau: float, noise: Tensor, hard: bool = False) -> tuple[Tensor, Tensor]:
    """Relaxed samples z^(l) = softmax((ℓ + g^(l)) / τ)  (E.2).

    logits: (B, K); noise: (L, B, K) Gumbel samples. Returns (z, log_z_soft), both (L, B, K).
    With ``hard`` z is the straight-through estimator one_hot(argmax) − sg(z_soft) + z_soft: its value
    is one-hot, its gradient that of z_soft. ``log_z_soft`` is always the log of the soft sample
    (log_softmax, finite even where z underflows to 0), used by the KL term.
    """
    log_z = torch.log_softmax((logits.unsqueeze(0) + noise) / tau, dim=-1)  # (L, B, K)
    z = log_z.exp()
    if hard:
        one_hot = F.one_hot(z.argmax(dim=-1), z.shape[-1]).to(z.dtype)
        z = one_hot - z.detach() + z
    return z, log_z


def gumbel_mc_loss(
    log_w: Tensor, log_sigma: Tensor, policy_loglik: Tensor, cfg: GumbelConfig, tau: float | None = None,
    noise: Tensor | None = None, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """L_MC of E.2, split into its likelihood and KL parts.

    log_w: (B, K) gate log-weights (gradient flows through z into the gate).
    log_sigma: (B, K) per-expert BT log-likelihood log σ_ik (used for the posterior logits).
    policy_loglik: (B, K) the term z multiplies: log σ_ik, or its label-smoothed form.
    noise: (L, B, K) Gumbel samples, or None to draw them with ``generator``.
    tau: temperature, default ``cfg.tau`` (the trainer passes the annealed value).

    Returns (likelihood_loss, kl_loss, z) with
        likelihood_loss = −(1/B) Σ_i (1/L) Σ_l Σ_k z_ik^(l) · policy_loglik_ik           (scalar)
        kl_loss         = (1/B) Σ_i (1/L) Σ_l Σ_k z_ik^(l) (log z_ik^(l) − log w_ik)     (scalar, unweighted)
        z               = (L, B, K)
    The KL uses the soft sample even when ``cfg.hard``: the one-hot value would make it −log w_argmax,
    a piecewise-constant function of the logits with no reparameterisation gradient of its own.
    """
    tau = cfg.tau if tau is None else tau
    B, K = log_sigma.shape
    if noise is None:
        noise = sample_gumbel((cfg.samples, B, K), generator=generator, device=log_sigma.device,
                              dtype=log_sigma.dtype)
    elif noise.dim() != 3 or noise.shape[1:] != (B, K):
        raise ValueError(f"gumbel noise must have shape (L, {B}, {K}), got {tuple(noise.shape)}")
    noise = noise.to(log_sigma.dtype)
    z, log_z = gumbel_softmax_samples(gumbel_logits(log_w, log_sigma, cfg.logits), tau, noise, cfg.hard)
    L = z.shape[0]
    likelihood_loss = -(z * policy_loglik.unsqueeze(0)).sum() / (L * B)
    z_soft = log_z.exp()
    kl_loss = (z_soft * (log_z - log_w.unsqueeze(0))).sum() / (L * B)
    return likelihood_loss, kl_loss, z
