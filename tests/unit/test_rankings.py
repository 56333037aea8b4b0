"""The Plackett–Luce mixture of docs/math.md §15: values and gradients by hand, m = 2 ≡ the pairwise loss, K = 1
m = 2 ≡ DPO, and the E-step / gate / Gumbel machinery on ranked items."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mixdpo_ds.kernels import mbt_loss

from mixdpo_ds.core.losses import EStepWeights, dpo_loss, mixdpo_loss
from mixdpo_ds.core.rankings import (
    corrected_rewards,
    plackett_luce_loglik,
    ranking_policy_loss,
    ranking_terms,
)


def _r(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1)


def test_plackett_luce_values_by_hand():
    # r = (1, 0, −1): (1 − log(e + 1 + 1/e)) + (0 − log(1 + 1/e))
    assert plackett_luce_loglik(_r(1, 0, -1)).item() == pytest.approx(-0.720868, abs=1e-6)
    # four equal rewards: every one of the 4! orders is equally likely
    assert plackett_luce_loglik(_r(0, 0, 0, 0)).item() == pytest.approx(-math.log(24), abs=1e-12)
    # (2, 1): log σ(1) = −0.313262; reversed order: log σ(−1) = −1.313262
    assert plackett_luce_loglik(_r(2, 1)).item() == pytest.approx(-0.313262, abs=1e-6)
    assert plackett_luce_loglik(_r(1, 2)).item() == pytest.approx(-1.313262, abs=1e-6)


def test_plackett_luce_gradient_by_hand():
    """∂ log P / ∂ r_i = 1[i ≤ m−2] − Σ_{j ≤ min(i, m−2)} exp(r_i − lse_j), lse_0 = 1.407606, lse_1 = 0.313262."""
    r = _r(1, 0, -1).requires_grad_()
    plackett_luce_loglik(r).sum().backward()
    # 1 − e^{1−1.407606};  1 − e^{−1.407606} − e^{−0.313262};  −e^{−2.407606} − e^{−1.313262}
    expected = [0.334759, 0.024213, -0.358972]
    assert r.grad.flatten().tolist() == pytest.approx(expected, abs=1e-6)
    assert r.grad.sum().item() == pytest.approx(0.0, abs=1e-12)  # a common shift of all rewards changes nothing


def test_plackett_luce_gradcheck_and_shapes():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 4, 2, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(plackett_luce_loglik, (r,))
    assert plackett_luce_loglik(r).shape == (3, 2)
    with pytest.raises(ValueError, match=r"\(B, m, K\) with m >= 2"):
        plackett_luce_loglik(torch.zeros(3, 1, 2))


def test_m2_is_logsigmoid_of_the_corrected_margin():
    """m = 2: the ranking formulas give eq. 4 with m = Δ + c·sg(Δ − ΔR), values and gradients (float rounding)."""
    g = torch.Generator().manual_seed(1)
    for c in (0, 1):
        h = torch.randn(5, 2, 3, dtype=torch.float64, generator=g).requires_grad_()
        log_w = torch.log_softmax(torch.randn(5, 3, dtype=torch.float64, generator=g), -1)
        mixture = torch.logsumexp(log_w.unsqueeze(1) + h, -1)  # (5, 2)
        margins, mix_margin, corrected, loglik = ranking_terms(h, mixture, c)
        delta = h[:, 0] - h[:, 1]
        pair_m = delta + c * (delta - (mixture[:, 0] - mixture[:, 1]).unsqueeze(-1)).detach()
        torch.testing.assert_close(loglik, F.logsigmoid(pair_m), rtol=0, atol=1e-12)
        torch.testing.assert_close(corrected, pair_m, rtol=0, atol=1e-12)
        (g1,) = torch.autograd.grad(loglik.sum(), h)
        (g2,) = torch.autograd.grad(F.logsigmoid(pair_m).sum(), h)
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)


def test_corrected_rewards_stop_gradient_and_by_hand():
    # h = (1, 0) of one expert, R = (0.5, 0.25): h' = h + (h − R) = (1.5, −0.25); gradient 1 per reward
    h = _r(1, 0).requires_grad_()
    out = corrected_rewards(h, torch.tensor([[0.5, 0.25]], dtype=torch.float64), 1)
    assert out.flatten().tolist() == pytest.approx([1.5, -0.25])
    out.sum().backward()
    assert h.grad.flatten().tolist() == [1.0, 1.0]
    assert corrected_rewards(h, torch.zeros(1, 2, dtype=torch.float64), 0) is h


def test_mixdpo_loss_pairs_unchanged_by_the_ranking_path():
    """(B, 2, K) still goes through eq. 4: mixdpo_loss equals the ranking formulas at m = 2 (float rounding)."""
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(6, 2, 3, dtype=torch.float64, generator=g).requires_grad_()
    rp = torch.randn(6, 2, dtype=torch.float64, generator=g)
    log_w = torch.log_softmax(torch.randn(6, 3, dtype=torch.float64, generator=g), -1)
    res = mixdpo_loss(lp, rp, log_w, 0.5)
    h = 0.5 * (lp - rp.unsqueeze(-1))
    _, _, _, loglik = ranking_terms(h, torch.logsumexp(log_w.unsqueeze(1) + h, -1), 1)
    torch.testing.assert_close(res.log_sigma, loglik, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.policy_loss, ranking_policy_loss(loglik, res.resp), rtol=0, atol=1e-12)


@pytest.mark.parametrize("c", [0, 1])
def test_k1_m2_equals_dpo(c):
    """K = 1, m = 2 through the Plackett–Luce formulas is TRL's sigmoid DPO loss, value and gradient."""
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(8, 2, 1, dtype=torch.float64, generator=g).requires_grad_()
    rp = torch.randn(8, 2, dtype=torch.float64, generator=g)
    h = 0.1 * (lp - rp.unsqueeze(-1))
    mixture = h[..., 0]  # K = 1, w = 1: R = h
    loss = ranking_policy_loss(ranking_terms(h, mixture, c)[3], torch.ones(8, 1, dtype=torch.float64))
    ref, _, _ = dpo_loss(lp[:, 0, 0], lp[:, 1, 0], rp[:, 0], rp[:, 1], 0.1)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    (g1,) = torch.autograd.grad(loss, lp)
    (g2,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)


def test_ranked_mixdpo_loss_by_hand():
    """m = 3, K = 2, one item: E-step q ∝ w · P (eq. 3 with the PL likelihood), policy loss −Σ q log P, gate loss
    −Σ q log w, best-vs-worst margins; K = 1 the loss is −mean log P (the Plackett–Luce DPO of Rafailov et al.)."""
    lp = torch.tensor([[[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]]], dtype=torch.float64)  # expert 0 agrees
    rp = torch.zeros(1, 3, dtype=torch.float64)
    log_w = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    res = mixdpo_loss(lp, rp, log_w, 1.0, posterior_correction=0)
    e = math.e
    logp = [1 - math.log(e + 1 + 1 / e) - math.log(1 + 1 / e), -1 - math.log(e + 1 + 1 / e) - math.log(1 + e)]
    assert res.log_sigma.flatten().tolist() == pytest.approx(logp, abs=1e-6)  # expert 1: the reversed order
    q0 = 0.25 * math.exp(logp[0]) / (0.25 * math.exp(logp[0]) + 0.75 * math.exp(logp[1]))
    assert res.resp.flatten().tolist() == pytest.approx([q0, 1 - q0], abs=1e-9)
    assert res.policy_loss.item() == pytest.approx(-(q0 * logp[0] + (1 - q0) * logp[1]), abs=1e-6)
    assert res.gate_loss.item() == pytest.approx(-(q0 * math.log(0.25) + (1 - q0) * math.log(0.75)), abs=1e-9)
    assert res.margins.flatten().tolist() == [2.0, -2.0]
    assert res.loglik.item() == pytest.approx(math.log(0.25 * math.exp(logp[0]) + 0.75 * math.exp(logp[1])), abs=1e-9)
    k1 = mixdpo_loss(lp[..., :1], rp, torch.zeros(1, 1, dtype=torch.float64), 1.0)
    assert k1.loss.item() == pytest.approx(0.720868, abs=1e-6)


def test_ranked_loss_gradients_reach_policy_and_gate_in_both_modes():
    g = torch.Generator().manual_seed(4)
    lp = torch.randn(5, 4, 3, generator=g).requires_grad_()
    logits = torch.randn(5, 3, generator=g).requires_grad_()
    for mode in ("exact", "gumbel"):
        res = mixdpo_loss(lp, torch.randn(5, 4, generator=g), torch.log_softmax(logits, -1), 0.3, mode=mode,
                          estep=EStepWeights(lambda_ent=0.5), lambda_global=0.1, generator=g)
        lp.grad = logits.grad = None
        res.loss.backward()
        assert torch.isfinite(res.loss) and lp.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0
        assert res.resp.shape == (5, 3) and torch.allclose(res.resp.sum(-1), torch.ones(5))
        assert res.metrics["rewards/accuracies"].shape == ()


def test_ranked_data_refuses_what_is_defined_for_pairs_only():
    lp, rp, log_w = torch.zeros(2, 3, 2), torch.zeros(2, 3), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="em.label_smoothing"):
        mixdpo_loss(lp, rp, log_w, 0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss.impl=triton fuses pairs only"):
        mbt_loss(lp, rp, log_w, 0.1, impl="triton")
    with pytest.raises(ValueError, match="m >= 2"):
        mixdpo_loss(torch.zeros(2, 1, 2), torch.zeros(2, 1), log_w, 0.1)
