"""lowrank_logprobs (kernels/lowrank.py): K low-rank expert heads sharing one base head. Naive by hand and against
K full heads; chunked against the fp64 naive reference, every output and every gradient by name."""
import math

import mixdpo_ds.kernels.chunked as chunked_module
import pytest
import torch
from kernel_reference import SLACK_ULPS
from mixdpo_ds.kernels import IGNORE_INDEX, expert_logprobs, lowrank_logprobs

NAMES = ("hidden", "base", "up", "down", "bias")


def make_lowrank(N, H, V, K, r, dtype, bias=True, seed=0):
    """hidden (N, H), base (V, H), up (K, V, r), down (K, r, H), bias (K, V) with O(1) logit deltas; every 4th
    target ignored."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"hidden": torch.randn(N, H, generator=g), "base": torch.randn(V, H, generator=g) * 2 / H**0.5,
               "up": torch.randn(K, V, r, generator=g) / r**0.5, "down": torch.randn(K, r, H, generator=g) / H**0.5,
               "bias": torch.randn(K, V, generator=g) * 0.3 if bias else None}
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = IGNORE_INDEX
    return {n: None if t is None else t.to(dtype) for n, t in tensors.items()}, targets


def run(impl, tensors, targets, grad, include_base=False, chunk_size=None):
    """Forward + backward on leaf copies -> {"logps", "d_hidden", "d_base", "d_up", "d_down", "d_bias"}."""
    leaves = {n: None if t is None else t.detach().clone().requires_grad_(True) for n, t in tensors.items()}
    logps = lowrank_logprobs(leaves["hidden"], leaves["base"], leaves["up"], leaves["down"], targets,
                             bias=leaves["bias"], include_base=include_base, impl=impl, chunk_size=chunk_size)
    logps.backward(grad.to(logps.dtype))
    out = {"logps": logps.detach()}
    out.update({f"d_{n}": t.grad for n, t in leaves.items() if t is not None})
    return out


def test_hand_computed_one_expert_rank_one():
    """H = 1, V = 2, K = 1, r = 1: W = [[0], [0]], A = [[0], [1]], B = [[ln 3]], h = 1 -> u = ln 3, z = [0, ln 3],
    p = [1/4, 3/4]; target 1 -> ln(3/4). dz = [-1/4, 1/4]: dA = dz ⊗ u = [[-ln3/4], [ln3/4]], du = dz · A = 1/4,
    dB = du · h = 1/4, dW = dz ⊗ h = [[-1/4], [1/4]], dh = dz · W + du · B = ln(3)/4. The base column (z = [0, 0])
    is ln(1/2)."""
    tensors = {"hidden": torch.tensor([[1.0], [2.0]]), "base": torch.zeros(2, 1), "up": torch.tensor([[[0.0], [1.0]]]),
               "down": torch.tensor([[[math.log(3.0)]]]), "bias": None}
    targets = torch.tensor([1, IGNORE_INDEX])
    for impl in ("naive", "chunked"):
        out = run(impl, tensors, targets, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), include_base=True)
        torch.testing.assert_close(out["logps"], torch.tensor([[math.log(0.75), math.log(0.5)], [0.0, 0.0]]))
        q = math.log(3.0) / 4
        torch.testing.assert_close(out["d_up"], torch.tensor([[[-q], [q]]]))
        torch.testing.assert_close(out["d_down"], torch.tensor([[[0.25]]]))
        torch.testing.assert_close(out["d_base"], torch.tensor([[-0.25], [0.25]]))
        torch.testing.assert_close(out["d_hidden"], torch.tensor([[q], [0.0]]))


def test_naive_equals_k_full_heads_and_zero_deltas_equal_the_base():
    """W + A_k B_k (+ b_k) as K full heads gives the same log-probs; A = 0 and b = 0 give the base head K times."""
    tensors, targets = make_lowrank(7, 6, 13, 3, 2, torch.float64)
    t = tensors
    full = t["base"] + torch.einsum("kvr,krh->kvh", t["up"], t["down"])  # (K, V, H)
    with_bias = lowrank_logprobs(t["hidden"], t["base"], t["up"], t["down"], targets, impl="naive")
    torch.testing.assert_close(with_bias, expert_logprobs(t["hidden"], full, targets, impl="naive"))
    for impl in ("naive", "chunked"):
        zero = lowrank_logprobs(t["hidden"], t["base"], torch.zeros_like(t["up"]), t["down"], targets,
                                bias=torch.zeros_like(t["bias"]), include_base=True, impl=impl)
        base = expert_logprobs(t["hidden"], t["base"][None], targets, impl="naive")  # (N, 1)
        torch.testing.assert_close(zero, base.expand(-1, 4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile_elements", [1 << 22, 40])  # one vocabulary tile; many token × vocabulary tiles
@pytest.mark.parametrize("include_base, bias", [(False, False), (True, True), (True, False)])
def test_chunked_fp64_equals_naive_fp64(tile_elements, include_base, bias, monkeypatch):
    """fp64 in: chunked and naive agree to fp64 rounding on the log-probs and all five gradients."""
    monkeypatch.setattr(chunked_module, "TILE_ELEMENTS", tile_elements)
    tensors, targets = make_lowrank(11, 9, 37, 3, 4, torch.float64, bias=bias)
    grad = torch.randn(11, 3 + include_base, dtype=torch.float64)
    ref = run("naive", tensors, targets, grad, include_base)
    out = run("chunked", tensors, targets, grad, include_base, chunk_size=3)
    assert out.keys() == ref.keys() == {"logps", *(f"d_{n}" for n in NAMES if tensors[n] is not None)}
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_no_worse_than_naive_against_fp64(dtype):
    """fp32 / bf16 inputs: chunked's error against the fp64 reference is no worse than naive's in the same dtype
    (plus a few ulps at the reference's scale), for the log-probs and every gradient; gradients keep input dtypes."""
    tensors, targets = make_lowrank(37, 48, 1000, 3, 8, dtype)
    grad = torch.randn(37, 4)
    ref = run("naive", {n: t.double() for n, t in tensors.items()}, targets, grad.double(), True)
    naive = run("naive", tensors, targets, grad, True)
    out = run("chunked", tensors, targets, grad, True, chunk_size=16)
    assert out["logps"].dtype == torch.float32
    for name, expected in ref.items():
        got = out[name]
        assert got.dtype == naive[name].dtype and torch.isfinite(got).all(), name
        err = (got.double() - expected).abs().max().item()
        err_naive = (naive[name].double() - expected).abs().max().item()
        slack = SLACK_ULPS * torch.finfo(got.dtype).eps * expected.abs().max().item()
        assert err <= err_naive + slack, f"{name}: error {err:.3e} > naive's {err_naive:.3e} + {slack:.3e}"


def test_only_some_inputs_need_grad():
    """Frozen trunk and frozen base (only A, B train): the gradients that exist equal naive's, the rest are None."""
    tensors, targets = make_lowrank(10, 8, 50, 2, 3, torch.float64, bias=False)
    grads = {}
    for impl in ("naive", "chunked"):
        up, down = (tensors[n].clone().requires_grad_(True) for n in ("up", "down"))
        base = tensors["base"].clone()
        lp = lowrank_logprobs(tensors["hidden"], base, up, down, targets, include_base=True, impl=impl)
        lp.sum().backward()
        grads[impl] = (up.grad, down.grad, base.grad)
    torch.testing.assert_close(grads["chunked"][0], grads["naive"][0])
    torch.testing.assert_close(grads["chunked"][1], grads["naive"][1])
    assert grads["chunked"][2] is None


def test_input_checks():
    tensors, targets = make_lowrank(4, 3, 10, 2, 2, torch.float32)
    t = tensors
    with pytest.raises(ValueError, match=r"up \(K, V, r\)"):
        lowrank_logprobs(t["hidden"], t["base"], t["up"][:, :5], t["down"], targets)
    with pytest.raises(ValueError, match="targets must be a long tensor"):
        lowrank_logprobs(t["hidden"], t["base"], t["up"], t["down"], targets.int())
    with pytest.raises(ValueError, match="impl=.triton.: allowed"):
        lowrank_logprobs(t["hidden"], t["base"], t["up"], t["down"], targets, impl="triton")
