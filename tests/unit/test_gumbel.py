"""Tests of the Monte Carlo (Gumbel-softmax) relaxation, mixdpo_ds.core.gumbel and mixdpo_loss(mode="gumbel")."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixdpo_ds.core.gumbel import GumbelConfig, gumbel_mc_loss, gumbel_softmax_samples, sample_gumbel
from mixdpo_ds.core.losses import dpo_loss, mixdpo_loss, policy_loss

torch.set_num_threads(1)


def _batch(seed=0, B=4, K=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    policy = (torch.randn(B, 2, K, generator=g, dtype=dtype) * 2 - 10).requires_grad_()
    logits = torch.randn(K, generator=g, dtype=dtype).requires_grad_()
    ref = torch.randn(B, 2, generator=g, dtype=dtype) - 10
    return policy, logits, ref


def test_gumbel_max_frequencies_match_softmax():
    """argmax_k z_k = argmax_k (ℓ_k + g_k) is Categorical(softmax ℓ) (Gumbel-max).

    ℓ = log [.1, .2, .3, .4], n = 20000 draws; Pearson χ² with 3 dof must stay below 16.27 (p = 0.001).
    """
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    noise = sample_gumbel((n, 1, 4), generator=torch.Generator().manual_seed(0))
    z, _ = gumbel_softmax_samples(p.log().unsqueeze(0), tau=0.7, noise=noise)
    counts = torch.bincount(z.argmax(-1).flatten(), minlength=4).float()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 16.27, (counts, chi2)
    # the soft sample itself: rows on the simplex
    torch.testing.assert_close(z.sum(-1), torch.ones(n, 1))


def test_gumbel_softmax_by_hand():
    """ℓ = [0, ln 2], g = [ln 2, 0], τ = 2: (ℓ + g)/τ = [ln 2 / 2, ln 2 / 2] → z = [.5, .5]."""
    logits = torch.tensor([[0.0, math.log(2)]], requires_grad=True)
    noise = torch.tensor([[[math.log(2), 0.0]]])
    z, log_z = gumbel_softmax_samples(logits, 2.0, noise)
    torch.testing.assert_close(z, torch.tensor([[[0.5, 0.5]]]))
    torch.testing.assert_close(log_z, torch.full((1, 1, 2), math.log(0.5)))


def test_straight_through_forward_is_one_hot_backward_is_the_soft_gradient():
    """ℓ = [0, ln 2], g = [ln 2, 0], τ = 2 → z_soft = [.5, .5]; with g = [ln 2, −0.2] the first index wins.
    Upstream v = [3, −1]: d(v·z)/dℓ = (1/τ) z ⊙ (v − v·z), the softmax Jacobian; with z = softmax([ln 2 / 2,
    ln 2 / 2 − 0.1]) that is [a, −a], a = z_0 z_1 (v_0 − v_1) / τ = 2 z_0 z_1. The straight-through sample has
    value one_hot = [1, 0] and exactly this gradient (the one-hot alone would give zero)."""
    logits = torch.tensor([[0.0, math.log(2)]], requires_grad=True)
    noise = torch.tensor([[[math.log(2), -0.2]]])
    v = torch.tensor([3.0, -1.0])
    zh, _ = gumbel_softmax_samples(logits, 2.0, noise, hard=True)
    torch.testing.assert_close(zh.detach(), torch.tensor([[[1.0, 0.0]]]))
    (g_st,) = torch.autograd.grad((zh * v).sum(), logits)
    zs, _ = gumbel_softmax_samples(logits, 2.0, noise, hard=False)
    (g_soft,) = torch.autograd.grad((zs * v).sum(), logits)
    z0 = 1 / (1 + math.exp(-0.1))  # softmax of [c, c − 0.1]
    a = 2 * z0 * (1 - z0)
    torch.testing.assert_close(g_soft, torch.tensor([[a, -a]]))
    torch.testing.assert_close(g_st, g_soft, atol=0, rtol=0)


def test_mc_loss_by_hand():
    """z = [.5, .5] (above), log σ = [ln .5, ln .25]: L_lik = −(.5 ln .5 + .5 ln .25) = 1.5 ln 2;
    w = [1/3, 2/3]: KL̂ = .5 ln(.5·3) + .5 ln(.5·1.5) = .5 ln(9/8)."""
    log_w = torch.tensor([[1 / 3, 2 / 3]]).log()
    log_sigma = torch.tensor([[0.5, 0.25]]).log()
    # ℓ = log w + log σ = ln[1/6, 1/6]: equal logits, zero noise → z = [.5, .5] for any τ
    lik, kl, z = gumbel_mc_loss(log_w, log_sigma, log_sigma, GumbelConfig(tau=0.8), noise=torch.zeros(1, 1, 2))
    torch.testing.assert_close(z, torch.full((1, 1, 2), 0.5))
    torch.testing.assert_close(lik, torch.tensor(1.5 * math.log(2)))
    torch.testing.assert_close(kl, torch.tensor(0.5 * math.log(9 / 8)))


@pytest.mark.parametrize("logits_kind", ["posterior", "prior"])
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_passes_gradient_into_gate(logits_kind, hard):
    """The relaxation alone (λ_kl = 0, λ_global = 0) trains the gate through z."""
    policy, logits, ref = _batch()
    cfg = GumbelConfig(samples=4, tau=1.0, logits=logits_kind, hard=hard)
    out = mixdpo_loss(policy, ref, logits.log_softmax(-1), 1.0, mode="gumbel", gumbel=cfg,
                      generator=torch.Generator().manual_seed(0))
    assert out.gate_loss.item() == 0.0
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert grad.abs().sum() > 1e-6
    assert not out.resp.requires_grad
    torch.testing.assert_close(out.resp.sum(-1), torch.ones(4))


def test_posterior_logits_do_not_route_policy_gradient():
    """With logits = posterior, log σ enters ℓ detached: the policy gradient equals the EM M-step gradient
    with q = mean_l z^(l) held fixed (L_MC likelihood = −(1/B) Σ_i Σ_k mean_l z · log σ)."""
    policy, logits, ref = _batch(seed=3)
    noise = sample_gumbel((5, 4, 3), generator=torch.Generator().manual_seed(1))
    out = mixdpo_loss(policy, ref, logits.log_softmax(-1), 1.0, mode="gumbel",
                      gumbel=GumbelConfig(samples=5, tau=0.9), noise=noise)
    (g_mc,) = torch.autograd.grad(out.policy_loss, policy, retain_graph=True)
    (g_em,) = torch.autograd.grad(policy_loss(out.corrected_margins, out.resp), policy)
    torch.testing.assert_close(g_mc, g_em)


def test_gradcheck_gumbel_prior_fixed_noise():
    """With fixed noise and prior logits the relaxed loss (incl. λ_kl and λ_global) is smooth: float64 gradcheck
    w.r.t. policy log-probs and gate logits (c = 0)."""
    policy, logits, ref = _batch(seed=4, B=3, K=3, dtype=torch.float64)
    noise = sample_gumbel((2, 3, 3), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cfg = GumbelConfig(samples=2, tau=0.8, logits="prior", lambda_kl=0.5)

    def f(p, lg):
        return mixdpo_loss(p, ref, lg.log_softmax(-1), 0.5, posterior_correction=0, mode="gumbel", gumbel=cfg,
                           noise=noise, lambda_global=0.2).loss

    assert torch.autograd.gradcheck(f, (policy, logits))


def test_noise_shape_checked_and_tau_override():
    policy, logits, ref = _batch()
    with pytest.raises(ValueError, match=r"\(L, 4, 3\)"):
        mixdpo_loss(policy, ref, logits.log_softmax(-1), 1.0, mode="gumbel", noise=torch.zeros(2, 3, 3))
    noise = sample_gumbel((1, 4, 3), generator=torch.Generator().manual_seed(0))
    a = mixdpo_loss(policy, ref, logits.log_softmax(-1), 1.0, mode="gumbel", noise=noise, tau=0.5)
    b = mixdpo_loss(policy, ref, logits.log_softmax(-1), 1.0, mode="gumbel", noise=noise,
                    gumbel=GumbelConfig(tau=0.5))
    torch.testing.assert_close(a.loss, b.loss)
    # a much lower τ sharpens z
    sharp = mixdpo_loss(policy, ref, logits.log_softmax(-1), 1.0, mode="gumbel", noise=noise, tau=0.01)
    assert sharp.resp.max(-1).values.min() > a.resp.max(-1).values.min()
    assert F.one_hot(sharp.resp.argmax(-1), 3).float().allclose(sharp.resp, atol=1e-3)


def test_gumbel_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"em.gumbel.logits must be one of \['posterior', 'prior'\], got 'x'"):
        GumbelConfig(logits="x")
    with pytest.raises(ValueError, match="em.gumbel.samples"):
        GumbelConfig(samples=0)
    with pytest.raises(ValueError, match="em.gumbel.tau"):
        GumbelConfig(tau=0.0)


@pytest.mark.parametrize("c", [0, 1])
def test_gumbel_k1_equals_dpo(c):
    """K = 1: every z^(l) = softmax of one logit = 1, so L_MC = −mean_i log σ(Δ_i) = DPO (ε = .1 too)."""
    g = torch.Generator().manual_seed(7)
    policy = torch.randn(5, 2, 1, generator=g) - 8
    ref = torch.randn(5, 2, generator=g) - 8
    out = mixdpo_loss(policy, ref, torch.zeros(5, 1), 0.3, posterior_correction=c, label_smoothing=0.1,
                      mode="gumbel", gumbel=GumbelConfig(samples=3), generator=g)
    loss, _, _ = dpo_loss(policy[:, 0, 0], policy[:, 1, 0], ref[:, 0], ref[:, 1], 0.3, 0.1)
    torch.testing.assert_close(out.loss, loss)
