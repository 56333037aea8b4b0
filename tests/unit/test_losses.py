"""Hand-computed tests of every docs/math.md §2–§5 formula in mixdpo_ds.core.losses (exact E-step path)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixdpo_ds.core.losses import (
    EStepWeights,
    chosen_nll,
    corrected_margins,
    dpo_loss,
    e_step,
    e_step_temperature,
    expert_margins,
    gate_loss,
    implicit_rewards,
    kl_to_uniform,
    mix_weight_update,
    mixdpo_loss,
    mixture_rewards,
    policy_loss,
)

torch.set_num_threads(1)
LC = math.log(math.cosh(0.5))  # 0.1201145...


def _example_batch():
    """One pair, K = 2, β = 0.5. Expert 0 prefers chosen, expert 1 the rejected.

    policy chosen lp = [-1, -3], rejected lp = [-2, -2]; shared ref (-2, -2).
    h+ = 0.5·([-1, -3] + 2) = [0.5, -0.5];  h- = [0, 0];  Δ = [0.5, -0.5].
    w = [0.5, 0.5]: R+ = log(0.5 e^0.5 + 0.5 e^-0.5) = log cosh 0.5 = 0.1201145, R- = log 1 = 0, ΔR = log cosh 0.5.
    """
    policy = torch.tensor([[[-1.0, -3.0], [-2.0, -2.0]]])  # (1, 2, 2)
    ref = torch.tensor([[-2.0, -2.0]])  # (1, 2)
    log_w = torch.log(torch.tensor([[0.5, 0.5]]))
    return policy, ref, log_w


def test_rewards_margins_mixture_corrected_by_hand():
    """Numbers in _example_batch; corrected (c = 1) m = Δ + (Δ − ΔR) = [1 − lc, −1 − lc], lc = log cosh 0.5."""
    policy, ref, log_w = _example_batch()
    h = implicit_rewards(policy, ref, 0.5)
    torch.testing.assert_close(h, torch.tensor([[[0.5, -0.5], [0.0, 0.0]]]))
    torch.testing.assert_close(implicit_rewards(policy, ref.unsqueeze(-1).expand(1, 2, 2), 0.5), h)
    delta = expert_margins(h)
    torch.testing.assert_close(delta, torch.tensor([[0.5, -0.5]]))
    mix = mixture_rewards(h, log_w)
    torch.testing.assert_close(mix, torch.tensor([[LC, 0.0]]))
    dR = mix[:, 0] - mix[:, 1]
    torch.testing.assert_close(corrected_margins(delta, dR, 0), delta)
    torch.testing.assert_close(corrected_margins(delta, dR, 1), torch.tensor([[1 - LC, -1 - LC]]))


def test_corrected_margin_gradient_is_stopped():
    """d m / d Δ = 1 for c = 1 (the correction sg(Δ − ΔR) carries no gradient)."""
    delta = torch.tensor([[0.5, -0.5]], requires_grad=True)
    dR = torch.tensor([0.3], requires_grad=True)
    corrected_margins(delta, dR, 1).sum().backward()
    torch.testing.assert_close(delta.grad, torch.ones(1, 2))
    assert dR.grad is None or torch.all(dR.grad == 0)


def test_e_step_is_bayes_rule_2x3():
    """q_k = w_k σ_k / Σ_j w_j σ_j.

    row 0: w = [.5, .3, .2], σ = [.2, .5, .5] → wσ = [.10, .15, .10] / .35 = [2/7, 3/7, 2/7]
    row 1: w = [.2, .2, .6], σ = [.9, .6, .1] → wσ = [.18, .12, .06] / .36 = [1/2, 1/3, 1/6]
    """
    w = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    sigma = torch.tensor([[0.2, 0.5, 0.5], [0.9, 0.6, 0.1]])
    q = e_step(w.log(), sigma.log())
    torch.testing.assert_close(q, torch.tensor([[2 / 7, 3 / 7, 2 / 7], [1 / 2, 1 / 3, 1 / 6]]))
    assert not q.requires_grad


def test_e_step_temperature_and_rejection():
    """α = λ_ent − λ_conf + λ_unif + λ_w with args (λ_w, λ_ent, λ_conf, λ_unif):
    defaults → 1; (1, .5, 0, .5) → 2; (1, 0, .5, 0) → .5; (1, 0, 1, 0) → 0, rejected."""
    assert e_step_temperature() == 1.0
    assert e_step_temperature(1.0, 0.5, 0.0, 0.5) == 2.0
    assert e_step_temperature(1.0, 0.0, 0.5, 0.0) == 0.5
    with pytest.raises(ValueError, match="lambda_conf"):
        e_step_temperature(1.0, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="lambda_w"):
        EStepWeights(lambda_w=0.0)
    with pytest.raises(ValueError, match="lambda_conf"):
        e_step(torch.zeros(1, 2), torch.zeros(1, 2), lambda_w=1.0, lambda_conf=2.0)
    assert EStepWeights(lambda_w=1.0, lambda_ent=0.5, lambda_unif=0.5).alpha == 2.0


def test_policy_loss_by_hand():
    """m = [0, ln 3], q = [.5, .5]: L = −(.5 ln σ(0) + .5 ln σ(ln 3)) = −(.5 ln .5 + .5 ln .75) = .5 ln(8/3).

    With ε = 0.1: per expert −(.9 ln σ(m) + .1 ln σ(−m)); σ(−ln 3) = 1/4, so
    L = .5·(.9 ln 2 + .1 ln 2) + .5·(−.9 ln .75 − .1 ln .25) = .5 ln 2 − .45 ln .75 − .05 ln .25.
    """
    m = torch.tensor([[0.0, math.log(3.0)]])
    q = torch.tensor([[0.5, 0.5]])
    torch.testing.assert_close(policy_loss(m, q), torch.tensor(0.5 * math.log(8 / 3)))
    expected = 0.5 * math.log(2) - 0.45 * math.log(0.75) - 0.05 * math.log(0.25)
    torch.testing.assert_close(policy_loss(m, q, 0.1), torch.tensor(expected))


def test_gate_loss_by_hand():
    """w = [[.5, .5], [.8, .2]], q = [[1, 0], [.5, .5]].

    CE = −½ [ln .5 + .5 ln .8 + .5 ln .2] = −½ [ln .5 + .5 ln .16] = −½ [ln .5 + ln .4] = −½ ln .2 = 0.8047190
    w̄ = [.65, .35]; KL(w̄‖U) = .65 ln 1.3 + .35 ln .7 = 0.0457011; with λ_global = 2: 0.8047190 + 0.0914022.
    """
    log_w = torch.tensor([[0.5, 0.5], [0.8, 0.2]]).log()
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    ce = -0.5 * math.log(0.2)
    kl = 0.65 * math.log(1.3) + 0.35 * math.log(0.7)
    torch.testing.assert_close(gate_loss(log_w, q), torch.tensor(ce))
    torch.testing.assert_close(gate_loss(log_w, q, lambda_global=2.0), torch.tensor(ce + 2 * kl))
    # a (K,) global log-weight broadcasts over the batch: w = [.5, .5] → CE = ln 2
    torch.testing.assert_close(gate_loss(torch.tensor([0.5, 0.5]).log(), q), torch.tensor(math.log(2)))


def test_mix_weight_update_by_hand():
    """w = [.5, .3, .2]; q rows [1, 0, 0], [.2, .6, .2] → mean q = [.6, .3, .1].

    ρ = 1 → [.6, .3, .1];  ρ = .5 → .5 [.5, .3, .2] + .5 [.6, .3, .1] = [.55, .3, .15].
    w_min = .2, ρ = 1: .1 → .2, rest [.6, .3] scaled to .8 → [.5333, .2667, .2].
    w_min = .3, ρ = 1 (cascade): .1 → .3, rest ·.7/.9 → [.4667, .2333]; .2333 < .3 → .3, rest → .4: [.4, .3, .3].
    """
    w = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.6, 0.2]])
    torch.testing.assert_close(mix_weight_update(w, q, rho=1.0, w_min=0.0), torch.tensor([0.6, 0.3, 0.1]))
    torch.testing.assert_close(mix_weight_update(w, q, rho=0.5, w_min=0.0), torch.tensor([0.55, 0.3, 0.15]))
    torch.testing.assert_close(mix_weight_update(w, q, rho=1.0, w_min=0.2), torch.tensor([0.8 * 2 / 3, 0.8 / 3, 0.2]))
    torch.testing.assert_close(mix_weight_update(w, q, rho=1.0, w_min=0.3), torch.tensor([0.4, 0.3, 0.3]))
    with pytest.raises(ValueError, match="rho"):
        mix_weight_update(w, q, rho=0.0)
    with pytest.raises(ValueError, match="w_min"):
        mix_weight_update(w, q, w_min=0.4)


def test_dpo_loss_one_pair_by_hand():
    """β = .1, lp± = (−10, −14), rp± = (−11, −12): logits = 4 − 1 = 3, β·logits = .3.

    loss = −ln σ(.3) = ln(1 + e^−.3) = 0.5543552; rewards: chosen .1·1 = .1, rejected .1·(−2) = −.2.
    ε = .1: .9·0.5543552 + .1·ln(1 + e^.3) = .9·0.5543552 + .1·0.8543552 = 0.5843552.
    """
    args = [torch.tensor([v]) for v in (-10.0, -14.0, -11.0, -12.0)]
    loss, chosen, rejected = dpo_loss(*args, beta=0.1)
    torch.testing.assert_close(loss, torch.tensor(math.log1p(math.exp(-0.3))))
    torch.testing.assert_close(chosen, torch.tensor([0.1]))
    torch.testing.assert_close(rejected, torch.tensor([-0.2]))
    loss_ls, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-0.3)) + 0.1 * math.log1p(math.exp(0.3))
    torch.testing.assert_close(loss_ls, torch.tensor(expected))


@pytest.mark.parametrize("c", [0, 1])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_k1_equals_dpo(c, eps):
    """K = 1: w = 1, q = 1, ΔR = Δ so m = Δ for both c; loss, gradient and reward metrics equal TRL's DPO."""
    g = torch.Generator().manual_seed(0)
    B, beta = 6, 0.2
    policy = (torch.randn(B, 2, 1, generator=g) * 5 - 20).requires_grad_()
    ref = torch.randn(B, 2, generator=g) * 5 - 20
    out = mixdpo_loss(policy, ref, torch.zeros(B, 1), beta, posterior_correction=c, label_smoothing=eps)
    loss, chosen, rejected = dpo_loss(policy[:, 0, 0], policy[:, 1, 0], ref[:, 0], ref[:, 1], beta, eps)
    torch.testing.assert_close(out.loss, loss)
    (g_mix,) = torch.autograd.grad(out.loss, policy)
    (g_dpo,) = torch.autograd.grad(loss, policy)
    torch.testing.assert_close(g_mix, g_dpo)
    torch.testing.assert_close(out.resp, torch.ones(B, 1))
    torch.testing.assert_close(out.metrics["rewards/chosen"], chosen.mean())
    torch.testing.assert_close(out.metrics["rewards/rejected"], rejected.mean())
    torch.testing.assert_close(out.metrics["rewards/accuracies"], (chosen > rejected).float().mean())  # TRL's
    torch.testing.assert_close(out.metrics["rewards/accuracies_posterior"], (chosen > rejected).float().mean())
    torch.testing.assert_close(out.metrics["logps/chosen"], policy[:, 0, 0].mean().detach())
    torch.testing.assert_close(out.gate_loss, torch.tensor(0.0))


def test_mixdpo_outputs_and_metrics_by_hand():
    """_example_batch with c = 0: σ(Δ) = [σ(.5), σ(−.5)], w = [.5, .5] → q = [σ(.5), σ(−.5)] = [.6225, .3775].

    LL = ln(.5σ(.5) + .5σ(−.5)) = ln .5; the ELBO at the exact posterior equals LL (Thm. 1 tightness);
    P = .5σ(.5) + .5σ(−.5) = .5; rewards/chosen = Σ q h+ = .5(q0 − q1) = .5·tanh(.25) = 0.1224593, rejected 0.
    """
    policy, ref, log_w = _example_batch()
    out = mixdpo_loss(policy, ref, log_w, 0.5, posterior_correction=0)
    s = torch.sigmoid(torch.tensor(0.5)).item()
    torch.testing.assert_close(out.resp, torch.tensor([[s, 1 - s]]))
    torch.testing.assert_close(out.loglik, torch.tensor([math.log(0.5)]))
    torch.testing.assert_close(out.elbo, out.loglik)
    m = out.metrics
    torch.testing.assert_close(m["p_mixture"], torch.tensor(0.5))
    torch.testing.assert_close(m["rewards/chosen"], torch.tensor(0.5 * math.tanh(0.25)))
    torch.testing.assert_close(m["rewards/rejected"], torch.tensor(0.0))
    torch.testing.assert_close(m["experts/0/margin"], torch.tensor(0.5))
    torch.testing.assert_close(m["experts/1/accuracy"], torch.tensor(0.0))
    torch.testing.assert_close(m["gate/entropy"], torch.tensor(math.log(2)))
    torch.testing.assert_close(m["resp/mean_0"], torch.tensor(s))
    assert {"mbt/loglik", "elbo", "resp/entropy", "rewards/margins", "rewards/accuracies", "gate/w_1"} <= set(m)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in m.values())
    # c = 1: m = [1 − lc, −1 − lc] (test_rewards_...) and log σ = logsigmoid(m)
    out1 = mixdpo_loss(policy, ref, log_w, 0.5, posterior_correction=1)
    torch.testing.assert_close(out1.log_sigma, F.logsigmoid(torch.tensor([[1 - LC, -1 - LC]])))


def test_given_resp_is_used_as_is():
    """A given resp (e.g. Dirichlet warm-up) replaces the E-step: q = [0, 1] → L_policy = −log σ_1 only."""
    policy, ref, log_w = _example_batch()
    q = torch.tensor([[0.0, 1.0]])
    out = mixdpo_loss(policy, ref, log_w, 0.5, posterior_correction=0, resp=q)
    torch.testing.assert_close(out.resp, q)
    torch.testing.assert_close(out.policy_loss, -F.logsigmoid(torch.tensor(-0.5)))
    torch.testing.assert_close(out.gate_loss, torch.tensor(math.log(2)))


def test_resp_carries_no_gradient():
    """resp is detached, and the loss gradient equals the one with the same q passed in as a constant."""
    g = torch.Generator().manual_seed(1)
    policy = torch.randn(4, 2, 3, generator=g).requires_grad_()
    logits = torch.randn(4, 3, generator=g).requires_grad_()
    ref = torch.randn(4, 2, generator=g)
    out = mixdpo_loss(policy, ref, logits.log_softmax(-1), 1.0)
    assert not out.resp.requires_grad
    grads = torch.autograd.grad(out.loss, (policy, logits))
    fixed = mixdpo_loss(policy, ref, logits.log_softmax(-1), 1.0, resp=out.resp.clone())
    for a, b in zip(grads, torch.autograd.grad(fixed.loss, (policy, logits)), strict=True):
        torch.testing.assert_close(a, b)


def _inputs64(seed=0, B=3, K=2):
    g = torch.Generator().manual_seed(seed)
    policy = (torch.randn(B, 2, K, generator=g, dtype=torch.float64) - 5).requires_grad_()
    logits = torch.randn(B, K, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.randn(B, 2, generator=g, dtype=torch.float64) - 5
    return policy, logits, ref


def test_gradcheck_c0():
    """c = 0 with q held fixed (the EM M-step gradient): the loss is a smooth function of both inputs."""
    policy, logits, ref = _inputs64()
    with torch.no_grad():
        resp = mixdpo_loss(policy, ref, logits.log_softmax(-1), 0.7, posterior_correction=0).resp

    def f(p, lg):
        return mixdpo_loss(p, ref, lg.log_softmax(-1), 0.7, posterior_correction=0, label_smoothing=0.1,
                           lambda_global=0.3, resp=resp).loss

    assert torch.autograd.gradcheck(f, (policy, logits))


def test_gradcheck_c1_against_frozen_correction():
    """c = 1: the correction sg(Δ − ΔR) is a constant for the gradient, so compare against a reference written
    from the formulas with that constant frozen at x0: gradcheck the reference, then match value and gradient."""
    policy, logits, ref = _inputs64(seed=2)
    beta, eps, lam = 0.7, 0.1, 0.3

    def parts(p, lg):
        lw = lg.log_softmax(-1)
        h = beta * (p - ref.unsqueeze(-1))
        delta = h[:, 0] - h[:, 1]
        dR = torch.logsumexp(lw + h[:, 0], -1) - torch.logsumexp(lw + h[:, 1], -1)
        return lw, delta, dR

    with torch.no_grad():
        lw0, delta0, dR0 = parts(policy, logits)
        offset = delta0 - dR0.unsqueeze(-1)
        resp = torch.softmax(lw0 + F.logsigmoid(delta0 + offset), -1)

    def reference(p, lg):
        lw, delta, _ = parts(p, lg)
        m = delta + offset
        ll = (1 - eps) * F.logsigmoid(m) + eps * F.logsigmoid(-m)
        wbar = lw.exp().mean(0)
        return -(resp * ll).sum(-1).mean() - (resp * lw).sum(-1).mean() + lam * (wbar * (wbar * 2).log()).sum()

    assert torch.autograd.gradcheck(reference, (policy, logits))
    out = mixdpo_loss(policy, ref, logits.log_softmax(-1), beta, posterior_correction=1, label_smoothing=eps,
                      lambda_global=lam)
    torch.testing.assert_close(out.resp, resp)
    torch.testing.assert_close(out.loss, reference(policy, logits))
    for a, b in zip(torch.autograd.grad(out.loss, (policy, logits)),
                    torch.autograd.grad(reference(policy, logits), (policy, logits)), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["exact", "gumbel"])
@pytest.mark.parametrize("c", [0, 1])
def test_numerical_safety(dtype, mode, c):
    """log-probs −1e4, margins ±1e3, one weight at w_min = 1e-3: finite loss, metrics and gradients (fp32 math)."""
    policy = torch.tensor([[[-1e4, -1e4 + 1e3], [-1e4 + 1e3, -1e4]],
                           [[-1e4, -1e4], [-1e4, -1e4]]], dtype=dtype).requires_grad_()
    ref = torch.tensor([[-1e4, -1e4], [-1.0, -1e4]], dtype=dtype)
    logits = torch.tensor([math.log(1e-3), math.log(1 - 1e-3)], dtype=dtype).requires_grad_()
    log_w = logits.log_softmax(-1).expand(2, 2)
    out = mixdpo_loss(policy, ref, log_w, 1.0, posterior_correction=c, lambda_global=0.5, mode=mode,
                      generator=torch.Generator().manual_seed(0), label_smoothing=0.1)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    for grad in torch.autograd.grad(out.loss, (policy, logits)):
        assert torch.isfinite(grad).all()


def test_bad_arguments_name_the_key():
    policy, ref, log_w = _example_batch()
    with pytest.raises(ValueError, match=r"em.mode must be one of \['exact', 'gumbel'\], got 'foo'"):
        mixdpo_loss(policy, ref, log_w, 0.5, mode="foo")
    with pytest.raises(ValueError, match="em.posterior_correction"):
        mixdpo_loss(policy, ref, log_w, 0.5, posterior_correction=2)
    with pytest.raises(ValueError, match=r"resp must have shape \(B, K\) = \(1, 2\)"):
        mixdpo_loss(policy, ref, log_w, 0.5, resp=torch.ones(1, 3) / 3)


def test_chosen_nll_by_hand_and_its_gradient():
    """RPO term: mean_i Σ_k q_ik (−lp_ik(chosen) / n_i). Pair 0: q (0.25, 0.75), lp (−4, −8), 2 tokens → 0.25·2 +
    0.75·4 = 3.5; pair 1: q (1, 0), lp (−3, −9), 3 tokens → 1. Mean 2.25. The rejected side plays no part; the
    gradient reaches the log-probs (−q_ik / n_i / B), never the responsibilities."""
    lp = torch.tensor([[[-4.0, -8.0], [-1.0, -1.0]], [[-3.0, -9.0], [-2.0, -2.0]]], requires_grad=True)
    q = torch.tensor([[0.25, 0.75], [1.0, 0.0]], requires_grad=True)
    v = chosen_nll(lp, torch.tensor([2, 3]), q)
    assert v.item() == pytest.approx(2.25)
    v.backward()
    want = torch.zeros(2, 2, 2)
    want[0, 0] = torch.tensor([-0.25 / 2, -0.75 / 2]) / 2
    want[1, 0] = torch.tensor([-1.0 / 3, 0.0]) / 2
    torch.testing.assert_close(lp.grad, want)
    assert q.grad is None


def test_kl_to_uniform_by_hand():
    """KL(w ‖ U): (0.5, 0.5, 0) → log 1.5 = 0.405465; uniform → 0; one-hot over K = 4 → log 4; the same value the
    gate loss's λ_global term gives for a batch whose mean weight is w."""
    assert kl_to_uniform(torch.tensor([0.5, 0.5, 0.0])).item() == pytest.approx(math.log(1.5), abs=1e-6)
    assert kl_to_uniform(torch.full((3,), 1 / 3)).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_to_uniform(torch.tensor([1.0, 0.0, 0.0, 0.0])).item() == pytest.approx(math.log(4), abs=1e-6)
    log_w = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.4, 0.5]]))
    resp = torch.zeros(2, 3)
    assert gate_loss(log_w, resp, lambda_global=1.0).item() == pytest.approx(
        kl_to_uniform(log_w.exp().mean(0)).item(), abs=1e-6)


def test_training_accuracy_is_the_mixture_prediction_and_does_not_see_the_label():
    """w = (0.9, 0.1), Δ = (−1, 3) (β = 1, c = 0, reference 0).

    Mixture: P = 0.9σ(−1) + 0.1σ(3) = 0.9·0.26894 + 0.1·0.95257 = 0.33731 < 0.5 → rewards/accuracies = 0.
    Posterior given the label: q ∝ w σ(Δ) = (0.24205, 0.09526) → q = (0.71759, 0.28241), Σ q Δ = 0.12964 > 0 → 1.
    Swap chosen and rejected (Δ = (1, −3)): P = 0.9σ(1) + 0.1σ(−3) = 0.66269 → the mixture's accuracy flips to 1,
    while the posterior one is 1 again: it sees which side won, the mixture prediction does not.
    """
    log_w = torch.tensor([[0.9, 0.1]]).log()
    policy = torch.tensor([[[-1.0, 3.0], [0.0, 0.0]]])
    out = mixdpo_loss(policy, torch.zeros(1, 2), log_w, 1.0, posterior_correction=0)
    torch.testing.assert_close(out.metrics["p_mixture"], torch.tensor(0.33731), atol=1e-5, rtol=0)
    assert out.metrics["rewards/accuracies"].item() == 0.0
    assert out.metrics["rewards/accuracies_posterior"].item() == 1.0
    torch.testing.assert_close(out.resp, torch.tensor([[0.71759, 0.28241]]), atol=1e-5, rtol=0)
    swapped = mixdpo_loss(policy.flip(1), torch.zeros(1, 2), log_w, 1.0, posterior_correction=0)
    torch.testing.assert_close(swapped.metrics["p_mixture"], torch.tensor(0.66269), atol=1e-5, rtol=0)
    assert swapped.metrics["rewards/accuracies"].item() == 1.0
    assert swapped.metrics["rewards/accuracies_posterior"].item() == 1.0
    # logps/chosen is gate-weighted: 0.9·(−1) + 0.1·3 = −0.6
    torch.testing.assert_close(out.metrics["logps/chosen"], torch.tensor(-0.6))
