"""Triton MBT loss: all of docs/math.md §2–§6 for one batch, forward and backward, in one kernel launch over (B, 2, K).

Paper: "Mix- and MoE-DPO: A Variational Inference Approach to DPO" (docs/math.md); the PyTorch twin and the
formula docstrings are `mixdpo_ds.core.losses` (same signature, same `MixDPOOutput`). Per pair i and expert k:

    h± = β (lp± − rp±),  Δ = h+ − h−,  ΔR = LSE_k(log w + h+) − LSE_k(log w + h−)             (eq. 10, 2)
    m = Δ + c·sg(Δ − ΔR),  log σ = logsigmoid(m),  ℓ_ε = (1 − ε) logsigmoid(m) + ε logsigmoid(−m)   (eq. 7, 4)
    exact:  q = softmax_k((λ_w log w + log σ) / α)  (no gradient; or the given resp)              (Thm. 1, L. 6)
            L_policy = −(1/B) Σ q ℓ_ε,   L_gate = −(1/B) Σ q log w + λ_g KL(w̄ ‖ U)              (eq. 11, 12)
    gumbel: z^(l) = softmax((log w + sg(log σ)·[posterior] + g^(l)) / τ)  (straight-through one-hot if hard)
            L_policy = −(1/(L·B)) Σ z ℓ_ε,  L_gate = λ_kl (1/(L·B)) Σ z_soft (log z_soft − log w) + λ_g KL(w̄ ‖ U)
    d L_policy / d lp± = ±β · ∂L_policy/∂m  (the sg term carries none);  L_gate does not depend on lp.
    d/d log w: through q·log w and KL(w̄ ‖ U) (exact), and through z by the softmax Jacobian (gumbel).

One program walks the batch in BLOCK_B blocks twice (w̄ first, for the λ_g term), so every reduction, the batch
means included, is sequential and deterministic. The forward kernel writes the gradients of L_policy and L_gate
for unit upstream gradients; the autograd backward only scales them. Only `loss`, `policy_loss` and `gate_loss`
of the output carry gradients (the tables are detached diagnostics).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mixdpo_ds.core.gumbel import GumbelConfig, sample_gumbel
from mixdpo_ds.core.losses import EStepWeights, MixDPOOutput, batch_metrics, e_step_temperature

POISON = False  # tests: outputs start as NaN, so an unwritten element shows


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    return tl.where(x >= 0, 1.0 / (1.0 + tl.exp(-x)), tl.exp(x) / (1.0 + tl.exp(x)))


@triton.jit
def _lse_k(x, mask):
    """logsumexp over experts (axis 1) of (BLOCK_B, K_PAD) x, padded experts excluded. Padded pairs (no expert)
    give a finite junk value instead of NaN (a real row's sum is ≥ 1, so the floor never applies to it)."""
    mx = tl.max(tl.where(mask, x, float("-inf")), axis=1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.where(mask, tl.exp(tl.where(mask, x, 0.0) - mx[:, None]), 0.0), axis=1)
    return mx + tl.log(tl.maximum(total, 1e-30))


@triton.jit
def _mbt_loss_kernel(
    policy_ptr, ref_ptr, log_w_ptr, resp_in_ptr, noise_ptr,  # inputs (B, 2, K), (B, 2, K), (B, K), (B, K), (L, B, K)
    rewards_ptr, margins_ptr, corrected_ptr, log_sigma_ptr, resp_ptr, z_ptr, pair_ptr, losses_ptr,  # outputs
    d_policy_ptr, d_logw_policy_ptr, d_logw_gate_ptr,  # gradients for unit upstream gradients
    B, L, beta, c, eps, lambda_w, alpha, lambda_global, lambda_kl, tau, log_k,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_B: tl.constexpr, GUMBEL: tl.constexpr, HAS_RESP: tl.constexpr,
    PRIOR: tl.constexpr, HARD: tl.constexpr,
):
    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < K
    # pass 1: w̄_k = (1/B) Σ_i w_ik, for λ_g KL(w̄ ‖ U)
    wbar = tl.zeros((K_PAD,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        m2 = (offs_b < B)[:, None] & mask_k[None, :]
        log_w = tl.load(log_w_ptr + offs_b[:, None] * K + offs_k[None, :], mask=m2, other=float("-inf"))
        wbar += tl.sum(tl.where(m2, tl.exp(log_w), 0.0), axis=0)
    wbar = wbar / B
    log_wbar = tl.log(tl.where(wbar > 0, wbar, 1.0))  # only used where w̄ > 0
    kl_global = tl.sum(tl.where(mask_k & (wbar > 0), wbar * (log_wbar + log_k), 0.0), axis=0)
    policy_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)  # per row of the block, summed once at the end
    gate_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    # pass 2: everything per pair
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        m2 = (offs_b < B)[:, None] & mask_k[None, :]
        bk = offs_b[:, None] * K + offs_k[None, :]  # (BLOCK_B, K_PAD) offsets into (B, K)
        bk2 = offs_b[:, None] * (2 * K) + offs_k[None, :]  # chosen entries of (B, 2, K); rejected at + K
        log_w = tl.load(log_w_ptr + bk, mask=m2, other=0.0)
        h_c = beta * (tl.load(policy_ptr + bk2, mask=m2, other=0.0) - tl.load(ref_ptr + bk2, mask=m2, other=0.0))
        h_r = beta * (tl.load(policy_ptr + bk2 + K, mask=m2, other=0.0)
                      - tl.load(ref_ptr + bk2 + K, mask=m2, other=0.0))
        delta = h_c - h_r
        mix_margin = _lse_k(log_w + h_c, m2) - _lse_k(log_w + h_r, m2)  # (BLOCK_B,)
        m = delta + c * (delta - mix_margin[:, None])
        log_sigma = _logsigmoid(m)
        loglik_eps = (1.0 - eps) * log_sigma + eps * _logsigmoid(-m)
        dloglik_dm = (1.0 - eps) * _sigmoid(-m) - eps * _sigmoid(m)
        d_logw_pol = tl.zeros((BLOCK_B, K_PAD), dtype=tl.float32)
        if GUMBEL:  # (the host turns it off when resp is given)
            if PRIOR:
                ell = log_w
            else:
                ell = log_w + log_sigma  # sg(log σ): this path gets no gradient to the policy
            weight = tl.zeros((BLOCK_B, K_PAD), dtype=tl.float32)  # Σ_l z (values; one-hot if HARD)
            kl_pair = tl.zeros((BLOCK_B,), dtype=tl.float32)
            d_logw_kl = tl.zeros((BLOCK_B, K_PAD), dtype=tl.float32)
            for l in range(0, L):
                g = tl.load(noise_ptr + l * B * K + bk, mask=m2, other=0.0)
                y = tl.where(m2, (ell + g) / tau, float("-inf"))
                log_z = y - _lse_k(y, m2)[:, None]
                z = tl.where(m2, tl.exp(log_z), 0.0)
                z_val = z
                if HARD:
                    is_max = (y == tl.max(y, axis=1)[:, None]) & m2
                    first = tl.min(tl.where(is_max, offs_k[None, :], K_PAD), axis=1)  # argmax, first on ties
                    z_val = (offs_k[None, :] == first[:, None]).to(tl.float32)
                tl.store(z_ptr + l * B * K + bk, z_val, mask=m2)
                weight += z_val
                a = tl.where(m2, -loglik_eps, 0.0)  # ∂(−Σ z ℓ_ε)/∂z
                d_logw_pol += z * (a - tl.sum(z * a, axis=1)[:, None]) / tau
                b = tl.where(m2, log_z - log_w, 0.0)
                kl_pair += tl.sum(z * b, axis=1)
                d_logw_kl += -z + z * (b - tl.sum(z * b, axis=1)[:, None]) / tau
            resp = weight / L
            policy_pair = -tl.sum(tl.where(m2, resp * loglik_eps, 0.0), axis=1)
            gate_pair = lambda_kl * kl_pair / L
            d_m = -resp * dloglik_dm
            d_logw_pol = d_logw_pol / L
            d_logw_gate = lambda_kl * d_logw_kl / L
        else:
            if HAS_RESP:
                resp = tl.load(resp_in_ptr + bk, mask=m2, other=0.0)
            else:
                e = tl.where(m2, (lambda_w * log_w + log_sigma) / alpha, float("-inf"))
                resp = tl.where(m2, tl.exp(e - _lse_k(e, m2)[:, None]), 0.0)
            policy_pair = -tl.sum(tl.where(m2, resp * loglik_eps, 0.0), axis=1)
            gate_pair = -tl.sum(tl.where(m2, resp * log_w, 0.0), axis=1)
            d_m = -resp * dloglik_dm
            d_logw_gate = -resp
        # λ_g KL(w̄ ‖ U): ∂/∂ log w_ik = (w_ik / B)(log w̄_k + log K + 1) · B (scaled back by 1/B below)
        w = tl.where(m2, tl.exp(log_w), 0.0)
        d_logw_gate += tl.where(w > 0, lambda_global * w * (log_wbar + log_k + 1.0)[None, :], 0.0)
        loglik = _lse_k(log_w + log_sigma, m2)
        log_resp = tl.log(tl.where(resp > 0, resp, 1.0))  # 0 log 0 = 0
        elbo = tl.sum(tl.where(m2, resp * (log_w + log_sigma - log_resp), 0.0), axis=1)
        tl.store(rewards_ptr + bk2, h_c, mask=m2)
        tl.store(rewards_ptr + bk2 + K, h_r, mask=m2)
        tl.store(margins_ptr + bk, delta, mask=m2)
        tl.store(corrected_ptr + bk, m, mask=m2)
        tl.store(log_sigma_ptr + bk, log_sigma, mask=m2)
        tl.store(resp_ptr + bk, resp, mask=m2)
        mask_b = offs_b < B
        tl.store(pair_ptr + offs_b * 3, mix_margin, mask=mask_b)
        tl.store(pair_ptr + offs_b * 3 + 1, loglik, mask=mask_b)
        tl.store(pair_ptr + offs_b * 3 + 2, elbo, mask=mask_b)
        tl.store(d_policy_ptr + bk2, beta * d_m / B, mask=m2)
        tl.store(d_policy_ptr + bk2 + K, -beta * d_m / B, mask=m2)
        tl.store(d_logw_policy_ptr + bk, d_logw_pol / B, mask=m2)
        tl.store(d_logw_gate_ptr + bk, d_logw_gate / B, mask=m2)
        policy_sum += tl.where(mask_b, policy_pair, 0.0)
        gate_sum += tl.where(mask_b, gate_pair, 0.0)
    tl.store(losses_ptr, tl.sum(policy_sum, axis=0) / B)
    tl.store(losses_ptr + 1, tl.sum(gate_sum, axis=0) / B + lambda_global * kl_global)


# ----------------------------------------------------------------------------- host side


def _empty(shape, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def mbt_loss_forward(policy_logps, ref_logps, log_w, resp, noise, *, beta, c, eps, lambda_w, alpha,
                     lambda_global, lambda_kl, tau, gumbel, prior, hard):
    """One launch. policy_logps, ref_logps (B, 2, K); log_w (B, K); resp (B, K) or None; noise (L, B, K) or None.
    Returns a dict of fp32 tables (see the kernel's outputs) and the unit-upstream gradients."""
    B, _, K = policy_logps.shape
    L = noise.shape[0] if noise is not None else 1
    dev = policy_logps.device
    f32 = [t.float().contiguous() if t is not None else None for t in (policy_logps, ref_logps, log_w, resp, noise)]
    dummy = f32[0]  # unused pointer arguments (their flags are off)
    out = dict(rewards=_empty((B, 2, K), dev), margins=_empty((B, K), dev), corrected=_empty((B, K), dev),
               log_sigma=_empty((B, K), dev), resp=_empty((B, K), dev),
               z=_empty((L if gumbel else 0, B, K), dev), pair=_empty((B, 3), dev), losses=_empty((2,), dev),
               d_policy=_empty((B, 2, K), dev), d_logw_policy=_empty((B, K), dev), d_logw_gate=_empty((B, K), dev))
    _mbt_loss_kernel[(1,)](
        f32[0], f32[1], f32[2], f32[3] if resp is not None else dummy, f32[4] if noise is not None else dummy,
        out["rewards"], out["margins"], out["corrected"], out["log_sigma"], out["resp"], out["z"], out["pair"],
        out["losses"], out["d_policy"], out["d_logw_policy"], out["d_logw_gate"],
        B, L, float(beta), float(c), float(eps), float(lambda_w), float(alpha), float(lambda_global),
        float(lambda_kl), float(tau), math.log(K),
        K=K, K_PAD=triton.next_power_of_2(K), BLOCK_B=min(triton.next_power_of_2(B), 64), GUMBEL=gumbel,
        HAS_RESP=resp is not None, PRIOR=prior, HARD=hard,
    )
    return out


class MBTLossFunction(torch.autograd.Function):
    """(policy_logps, ref_logps, log_w) → (policy_loss, gate_loss, tables); the kernel already wrote the
    gradients for unit upstream gradients, backward scales them."""

    @staticmethod
    def forward(ctx, policy_logps, ref_logps, log_w, resp, noise, kwargs):
        out = mbt_loss_forward(policy_logps, ref_logps, log_w, resp, noise, **kwargs)
        ctx.save_for_backward(out["d_policy"], out["d_logw_policy"], out["d_logw_gate"])
        ctx.dtypes = (policy_logps.dtype, ref_logps.dtype, log_w.dtype)
        tables = [out[k] for k in ("rewards", "margins", "corrected", "log_sigma", "resp", "z", "pair")]
        ctx.mark_non_differentiable(*tables)
        return (out["losses"][0].clone(), out["losses"][1].clone(), *tables)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_policy, g_gate, *unused):
        d_policy_unit, d_logw_policy, d_logw_gate = ctx.saved_tensors
        d_policy = g_policy * d_policy_unit
        d_log_w = g_policy * d_logw_policy + g_gate * d_logw_gate
        d_ref = -d_policy if ctx.needs_input_grad[1] else None  # h = β (lp − rp)
        p_dtype, r_dtype, w_dtype = ctx.dtypes
        return (d_policy.to(p_dtype), None if d_ref is None else d_ref.to(r_dtype), d_log_w.to(w_dtype), None,
                None, None)


def mbt_loss_triton(
    policy_logps, ref_logps, log_w, beta, posterior_correction=1, label_smoothing=0.0, estep=None,
    lambda_global=0.0, resp=None, mode="exact", gumbel=None, noise=None, generator=None, tau=None,
) -> MixDPOOutput:
    """`mixdpo_ds.core.losses.mixdpo_loss` by one Triton kernel; same arguments, same `MixDPOOutput` (fp32 tables)."""
    if posterior_correction not in (0, 1):
        raise ValueError(f"em.posterior_correction must be one of [0, 1], got {posterior_correction!r}")
    if mode not in ("exact", "gumbel"):
        raise ValueError(f"em.mode must be one of ['exact', 'gumbel'], got {mode!r}")
    if torch.is_tensor(beta):
        raise ValueError("impl='triton' takes beta as a Python float")
    estep = estep or EStepWeights()
    B, _, K = policy_logps.shape
    log_w = log_w.expand(B, K)
    ref = ref_logps.unsqueeze(-1) if ref_logps.dim() == 2 else ref_logps
    ref = ref.expand(B, 2, K)
    use_gumbel = mode == "gumbel" and resp is None
    gumbel = gumbel or GumbelConfig()
    tau = gumbel.tau if tau is None else tau
    if use_gumbel and noise is None:
        noise = sample_gumbel((gumbel.samples, B, K), generator=generator, device=policy_logps.device)
    elif use_gumbel and (noise.dim() != 3 or noise.shape[1:] != (B, K)):
        raise ValueError(f"gumbel noise must have shape (L, {B}, {K}), got {tuple(noise.shape)}")
    kwargs = dict(beta=beta, c=posterior_correction, eps=label_smoothing, lambda_w=estep.lambda_w,
                  alpha=e_step_temperature(estep.lambda_w, estep.lambda_ent, estep.lambda_conf, estep.lambda_unif),
                  lambda_global=lambda_global, lambda_kl=gumbel.lambda_kl, tau=tau, gumbel=use_gumbel,
                  prior=gumbel.logits == "prior", hard=gumbel.hard)
    pol, gate, rewards, margins, corrected, log_sigma, q, _, pair = MBTLossFunction.apply(
        policy_logps, ref, log_w, None if resp is None else resp.detach(), noise if use_gumbel else None, kwargs)
    log_w32 = log_w.detach().float()
    metrics = batch_metrics(policy_logps.detach(), rewards, margins, log_w32, q, pair[:, 1], pair[:, 2])
    return MixDPOOutput(loss=pol + gate, policy_loss=pol, gate_loss=gate, resp=q, log_sigma=log_sigma,
                        margins=margins, corrected_margins=corrected, mixture_margin=pair[:, 0], loglik=pair[:, 1],
                        elbo=pair[:, 2], metrics=metrics)

