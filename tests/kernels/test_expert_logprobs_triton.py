"""Triton expert_logprobs against the fp64 naive reference: outputs and both gradients, under TRITON_INTERPRET=1
on CPU (compiled on a GPU via benchmarks/gpu_check.sh)."""
import math

import pytest
import torch
from kernel_reference import assert_no_worse_than_naive, kernel_device, make_inputs, reference, run
from mixdpo_ds.kernels import IGNORE_INDEX, expert_logprobs, triton_module

pytestmark = pytest.mark.kernels


@pytest.fixture
def triton_kernels(monkeypatch):
    """The Triton module with POISON on: outputs start as NaN, so an unwritten element fails the test."""
    module = triton_module("expert_logprobs")
    monkeypatch.setattr(module, "POISON", True)
    return module


@pytest.mark.parametrize(
    "shape, dtype",
    [((37, 48, 1000, 3), torch.float32),  # the brief's shape; V spans several vocabulary tiles
     ((13, 33, 257, 2), torch.bfloat16),  # odd H and V, bf16
     ((21, 17, 129, 5), torch.float16),  # K = 5 pads to K_PAD = 8
     ((70, 80, 300, 1), torch.float32)],  # K = 1; N and H span two token / hidden tiles
)
@pytest.mark.parametrize("vocab_split", [None, 3])  # forward and d_hidden over 3 vocabulary splits (the GPU's path)
def test_triton_matches_reference(shape, dtype, vocab_split, triton_kernels, monkeypatch):
    monkeypatch.setattr(triton_kernels, "VOCAB_SPLIT", vocab_split)
    N, H, V, K = shape
    hidden, heads, targets = make_inputs(N, H, V, K, dtype, device=kernel_device())
    grad = torch.randn(N, K, device=kernel_device())
    ref = reference(hidden, heads, targets, grad)
    naive = run("naive", hidden, heads, targets, grad)
    out = run("triton", hidden, heads, targets, grad)
    assert out["logps"].dtype == torch.float32
    assert out["d_hidden"].dtype == dtype and out["d_heads"].dtype == dtype
    assert_no_worse_than_naive(out, naive, ref)
    ignored = targets == IGNORE_INDEX
    assert (out["logps"][ignored] == 0).all() and (out["d_hidden"][ignored] == 0).all()


def test_triton_lse_table_and_partial_grads(triton_kernels):
    """The forward's (N, K) log-sum-exp table is exact; backward with only one input needing a gradient."""
    hidden, heads, targets = make_inputs(9, 20, 70, 3, torch.float32, device=kernel_device())
    logps, lse = triton_kernels.expert_logprobs_forward(hidden, heads, targets)
    expected = torch.logsumexp(torch.einsum("nh,kvh->nkv", hidden.double(), heads.double()), dim=-1)
    torch.testing.assert_close(lse.double(), expected, rtol=1e-6, atol=1e-6)
    h = hidden.clone().requires_grad_(True)
    expert_logprobs(h, heads, targets, impl="triton").sum().backward()
    ref = run("naive", hidden, heads, targets, torch.ones(9, 3, device=kernel_device()))
    torch.testing.assert_close(h.grad, ref["d_hidden"], rtol=1e-5, atol=1e-6)


def test_triton_hand_computed_one_head(triton_kernels):
    """As tests/kernels/test_expert_logprobs_chunked.py: z = [0, ln 3], p = [1/4, 3/4], target 1 → ln(3/4);
    d hidden = ln(3)/4, d heads = [[−1/4], [1/4]]; the ignored second token gives 0 and no gradient."""
    device = kernel_device()
    hidden = torch.tensor([[1.0], [2.0]], device=device)
    heads = torch.tensor([[[0.0], [math.log(3.0)]]], device=device)
    out = run("triton", hidden, heads, torch.tensor([1, IGNORE_INDEX], device=device), torch.ones(2, 1, device=device))
    torch.testing.assert_close(out["logps"].cpu(), torch.tensor([[math.log(0.75)], [0.0]]))
    torch.testing.assert_close(out["d_hidden"].cpu(), torch.tensor([[math.log(3.0) / 4], [0.0]]))
    torch.testing.assert_close(out["d_heads"].cpu(), torch.tensor([[[-0.25], [0.25]]]))


def test_triton_is_deterministic(triton_kernels, monkeypatch):
    """No atomics: two runs give bitwise-equal outputs and gradients (vocabulary splits included)."""
    monkeypatch.setattr(triton_kernels, "VOCAB_SPLIT", 2)
    hidden, heads, targets = make_inputs(70, 40, 300, 3, torch.bfloat16, device=kernel_device())
    grad = torch.randn(70, 3, device=kernel_device())
    first, second = (run("triton", hidden, heads, targets, grad) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_triton_rejects_fp64():
    hidden, heads, targets = make_inputs(4, 3, 10, 2, torch.float64, device=kernel_device())
    with pytest.raises(ValueError, match="fp32 / bf16 / fp16"):
        expert_logprobs(hidden, heads, targets, impl="triton")


def test_importing_the_triton_module_keeps_the_public_functions(triton_kernels):
    """kernels/expert_logprobs.py shares its name with the public function; the lazy import must not shadow it."""
    import mixdpo_ds.kernels as kernels

    triton_module("mbt_loss")
    assert kernels.expert_logprobs is expert_logprobs and callable(kernels.mbt_loss)
    assert triton_kernels.__name__ == "mixdpo_ds.kernels.expert_logprobs"
