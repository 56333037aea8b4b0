"""Shared helpers of the kernel tests: inputs, the fp64 reference and the tolerance rule.

Tolerance rule (apple/ml-cross-entropy): for every output and gradient, the error of an implementation
against the fp64 naive reference must not exceed the error of the naive implementation run in the same dtype,
plus a small slack of a few units of the dtype's rounding at the reference's scale.
"""
from __future__ import annotations

import os

import torch
from mixdpo_ds.kernels import IGNORE_INDEX, expert_logprobs

SLACK_ULPS = 4.0


def kernel_device() -> str:
    """Where Triton tests put tensors: the GPU when compiled, the CPU under TRITON_INTERPRET=1."""
    return "cpu" if os.environ.get("TRITON_INTERPRET", "1") == "1" else "cuda"


def make_inputs(N, H, V, K, dtype, device="cpu", ignore_every=4, generator=None):
    """hidden (N, H), heads (K, V, H) with logits of O(1..10) spread, targets (N,) with every
    `ignore_every`-th token ignored (-100). Fresh random values unless a generator is given."""
    hidden = torch.randn(N, H, generator=generator).to(device=device, dtype=dtype)
    heads = (torch.randn(K, V, H, generator=generator) * 2 / H**0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=generator).to(device)
    if ignore_every:
        targets[::ignore_every] = IGNORE_INDEX
    return hidden, heads, targets


def run(impl, hidden, heads, targets, grad, **kwargs):
    """Forward and backward of one impl on leaf copies; returns {"logps", "d_hidden", "d_heads"}."""
    h = hidden.detach().clone().requires_grad_(True)
    w = heads.detach().clone().requires_grad_(True)
    logps = expert_logprobs(h, w, targets, impl=impl, **kwargs)
    logps.backward(grad.to(logps.dtype))
    return {"logps": logps.detach(), "d_hidden": h.grad, "d_heads": w.grad}


def reference(hidden, heads, targets, grad):
    """The naive impl in fp64 on the same (already rounded) inputs, on the CPU."""
    return run("naive", hidden.double().cpu(), heads.double().cpu(), targets.cpu(), grad.double().cpu())


def assert_no_worse_than_naive(out, naive, ref):
    """err(impl) ≤ err(naive, same dtype) + SLACK_ULPS · eps(tensor dtype) · max|ref|, for every tensor by name."""
    for name, expected in ref.items():
        got = out[name]
        assert got is not None and got.dtype == naive[name].dtype, f"{name}: dtype {got.dtype}"
        eps = torch.finfo(got.dtype).eps
        assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
        assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
        err = (got.double().cpu() - expected).abs().max().item()
        err_naive = (naive[name].double().cpu() - expected).abs().max().item()
        slack = SLACK_ULPS * eps * max(expected.abs().max().item(), 1e-30)
        assert err <= err_naive + slack, f"{name}: error {err:.3e} > naive's {err_naive:.3e} + {slack:.3e}"
