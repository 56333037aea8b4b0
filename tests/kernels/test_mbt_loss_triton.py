"""Triton mbt_loss against mixdpo_ds.core.losses.mixdpo_loss in fp64: every output table, the losses and the gradients
to policy log-probs, reference log-probs and gate logits, for the exact and Gumbel E-steps and their options."""
import math

import pytest
import torch
from kernel_reference import kernel_device
from mixdpo_ds.kernels import mbt_loss, triton_module

from mixdpo_ds.core.losses import EStepWeights, GumbelConfig

pytestmark = pytest.mark.kernels

TABLES = ("resp", "log_sigma", "margins", "corrected_margins", "mixture_margin", "loglik", "elbo")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(triton_module("mbt_loss"), "POISON", True)


def _inputs(B, K, global_gate, ref_per_expert, device):
    policy = (-40 + 5 * torch.randn(B, 2, K)).to(device)
    ref = (-40 + 5 * torch.randn(B, 2, K) if ref_per_expert else -40 + 5 * torch.randn(B, 2)).to(device)
    gate_logits = torch.randn(K if global_gate else (B, K)).to(device)
    return policy, ref, gate_logits


def _run(impl, policy, ref, gate_logits, dtype, **kwargs):
    """Loss, tables and gradients (policy, ref, gate logits) of one impl, on leaf copies in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (policy, ref, gate_logits)]
    if "noise" in kwargs:
        kwargs["noise"] = kwargs["noise"].to(dtype)
    out = mbt_loss(leaves[0], leaves[1], torch.log_softmax(leaves[2], -1), 0.5, impl=impl, **kwargs)
    (out.loss + 0.3 * out.policy_loss).backward()  # distinct upstream gradients for the two losses
    result = {name: getattr(out, name).detach() for name in ("loss", "policy_loss", "gate_loss", *TABLES)}
    result.update({f"d_{n}": t.grad for n, t in zip(("policy", "ref", "gate"), leaves, strict=True)})
    result.update({f"metric {k}": v.detach() for k, v in out.metrics.items()})
    return result


CASES = {
    "exact": dict(),
    "exact c=0 smoothing": dict(posterior_correction=0, label_smoothing=0.1),
    "exact regularised": dict(estep=EStepWeights(lambda_w=0.5, lambda_ent=0.7, lambda_conf=0.2),
                              lambda_global=0.3),
    "given resp": dict(resp="dirichlet", mode="gumbel"),
    "gumbel posterior": dict(mode="gumbel", gumbel=GumbelConfig(samples=3, tau=0.7, lambda_kl=0.2),
                             lambda_global=0.1),
    "gumbel prior hard": dict(mode="gumbel", gumbel=GumbelConfig(samples=2, logits="prior", hard=True,
                                                                  lambda_kl=0.5), label_smoothing=0.05, tau=1.3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("B, K, global_gate, ref_per_expert", [(6, 3, False, False), (70, 5, True, True),
                                                               (4, 1, True, False)])
def test_mbt_loss_triton_matches_pytorch(case, B, K, global_gate, ref_per_expert):
    device = kernel_device()
    policy, ref, gate_logits = _inputs(B, K, global_gate, ref_per_expert, device)
    kwargs = dict(CASES[case])
    if kwargs.get("resp") == "dirichlet":
        kwargs["resp"] = torch.distributions.Dirichlet(torch.ones(K)).sample((B,)).to(device)
    if kwargs.get("mode") == "gumbel" and "resp" not in kwargs:
        kwargs["noise"] = -torch.log(torch.empty(kwargs["gumbel"].samples, B, K).exponential_()).to(device)
    ref64 = _run("naive", policy, ref, gate_logits, torch.float64, **kwargs)
    naive32 = _run("naive", policy, ref, gate_logits, torch.float32, **kwargs)
    out = _run("triton", policy, ref, gate_logits, torch.float32, **kwargs)
    assert out.keys() == ref64.keys()
    for name, expected in ref64.items():
        got = out[name]
        assert got.shape == expected.shape and torch.isfinite(got).all(), name
        err = (got.double() - expected).abs().max().item()
        err_naive = (naive32[name].double() - expected).abs().max().item()
        slack = 16 * torch.finfo(torch.float32).eps * max(expected.abs().max().item(), 1.0)
        assert err <= err_naive + slack, f"{case} {name}: error {err:.3e} > naive's {err_naive:.3e} + {slack:.3e}"


def test_mbt_loss_triton_hand_computed_k1_is_dpo():
    """K = 1, β = 0.5, lp = (−10, −12), rp = (−11, −11): Δ = 0.5·(1 − (−1)) = 1, ΔR = Δ, so m = 1 for c = 1;
    q = 1, L_policy = −logsigmoid(1) = 0.31326; L_gate = −q·log w = 0 (w = 1);
    d L / d lp+ = −β·σ(−1) = −0.5·0.26894 = −0.13447, d L / d lp− = +0.13447."""
    device = kernel_device()
    policy = torch.tensor([[[-10.0], [-12.0]]], device=device, requires_grad=True)
    out = mbt_loss(policy, torch.tensor([[-11.0, -11.0]], device=device), torch.zeros(1, device=device), 0.5,
                   impl="triton")
    out.loss.backward()
    assert math.isclose(out.policy_loss.item(), 0.31326, abs_tol=1e-5) and out.gate_loss.item() == 0
    assert math.isclose(out.corrected_margins.item(), 1.0, abs_tol=1e-6) and out.resp.item() == 1
    torch.testing.assert_close(policy.grad.view(2).cpu(), torch.tensor([-0.13447, 0.13447]), atol=1e-5, rtol=0)


def test_mbt_loss_triton_has_the_signature_of_mixdpo_loss():
    """Same parameter names, order and defaults as mixdpo_ds.core.losses.mixdpo_loss, so a change there shows here."""
    import inspect

    from mixdpo_ds.core.losses import mixdpo_loss

    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(triton_module("mbt_loss").mbt_loss_triton) == params(mixdpo_loss)
