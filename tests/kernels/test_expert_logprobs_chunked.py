"""expert_logprobs: naive (hand-computed) and chunked (against the fp64 reference, bounded memory)."""
import math

import mixdpo_ds.kernels.chunked as chunked_module
import pytest
import torch
from kernel_reference import assert_no_worse_than_naive, make_inputs, reference, run
from mixdpo_ds.kernels import IGNORE_INDEX, default_impl, expert_logprobs
from torch.utils._python_dispatch import TorchDispatchMode


def test_hand_computed_one_head():
    """H = 1, V = 2, K = 1: hidden = [1], head rows w_0 = [0], w_1 = [ln 3] → logits z = [0, ln 3],
    softmax p = [1/4, 3/4]; target 1 → log p_1 = ln(3/4) = −0.28768.
    dz = onehot − p = [−1/4, 1/4]; d hidden = Σ_v dz_v w_v = ln(3)/4 = 0.27465; d heads = dz ⊗ hidden
    = [[−1/4], [1/4]]. A second, ignored token (−100) gives 0 and no gradient."""
    hidden = torch.tensor([[1.0], [2.0]])
    heads = torch.tensor([[[0.0], [math.log(3.0)]]])
    targets = torch.tensor([1, IGNORE_INDEX])
    for impl in ("naive", "chunked"):
        out = run(impl, hidden, heads, targets, torch.ones(2, 1))
        torch.testing.assert_close(out["logps"], torch.tensor([[math.log(0.75)], [0.0]]))
        torch.testing.assert_close(out["d_hidden"], torch.tensor([[math.log(3.0) / 4], [0.0]]))
        torch.testing.assert_close(out["d_heads"], torch.tensor([[[-0.25], [0.25]]]))


def test_k_heads_are_independent_log_softmaxes():
    """Each column k equals torch's log_softmax of head k alone; rows sum to 1 over all targets."""
    hidden, heads, _ = make_inputs(5, 6, 11, 3, torch.float64, ignore_every=0)
    for v in (0, 10):
        logps = expert_logprobs(hidden, heads, torch.full((5,), v), impl="chunked")
        for k in range(3):
            torch.testing.assert_close(logps[:, k], (hidden @ heads[k].T).log_softmax(-1)[:, v])
    total = sum(expert_logprobs(hidden, heads, torch.full((5,), v), impl="chunked").exp() for v in range(11))
    torch.testing.assert_close(total, torch.ones(5, 3, dtype=torch.float64))


# fp32 chunks stay ≥ 16 tokens: MKL's sgemm is ~3x less accurate for fewer rows (a (7, 1000) @ (1000, 48)
# product errs 1.1e-6 where the (37, 1000) one errs 3.6e-7), which is the BLAS, not the chunking.
@pytest.mark.parametrize("tile_elements", [1 << 22, 4000])  # one vocab tile; many (token × vocab) tiles
@pytest.mark.parametrize(
    "shape, dtype, chunk_size",
    [((37, 48, 1000, 3), torch.float32, None), ((37, 48, 1000, 3), torch.float32, 16),
     ((13, 33, 257, 2), torch.bfloat16, 5), ((13, 33, 257, 2), torch.float16, None)],
)
def test_chunked_matches_reference(shape, dtype, chunk_size, tile_elements, monkeypatch):
    monkeypatch.setattr(chunked_module, "TILE_ELEMENTS", tile_elements)
    N, H, V, K = shape
    hidden, heads, targets = make_inputs(N, H, V, K, dtype)
    grad = torch.randn(N, K)
    ref = reference(hidden, heads, targets, grad)
    naive = run("naive", hidden, heads, targets, grad)
    out = run("chunked", hidden, heads, targets, grad, chunk_size=chunk_size)
    assert out["logps"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out["d_hidden"].dtype == dtype and out["d_heads"].dtype == dtype
    assert_no_worse_than_naive(out, naive, ref)
    ignored = targets == IGNORE_INDEX
    assert (out["logps"][ignored] == 0).all() and (out["d_hidden"][ignored] == 0).all()


def test_chunked_fp64_equals_naive_with_tiny_tiles(monkeypatch):
    """fp64 in → fp64 math and output; 1-token × 7-vocab tiles agree with naive to fp64 rounding."""
    monkeypatch.setattr(chunked_module, "TILE_ELEMENTS", 7)
    hidden, heads, targets = make_inputs(9, 17, 101, 2, torch.float64)
    grad = torch.randn(9, 2, dtype=torch.float64)
    ref, out = reference(hidden, heads, targets, grad), run("chunked", hidden, heads, targets, grad, chunk_size=1)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-12, atol=1e-12, msg=name)


def test_only_one_input_requires_grad():
    hidden, heads, targets = make_inputs(6, 5, 30, 2, torch.float32)
    h = hidden.clone().requires_grad_(True)
    expert_logprobs(h, heads, targets, impl="chunked").sum().backward()
    w = heads.clone().requires_grad_(True)
    expert_logprobs(hidden, w, targets, impl="chunked").sum().backward()
    ref = run("naive", hidden, heads, targets, torch.ones(6, 2))
    torch.testing.assert_close(h.grad, ref["d_hidden"])
    torch.testing.assert_close(w.grad, ref["d_heads"])


class LargestAllocation(TorchDispatchMode):
    """Largest number of elements of any tensor produced by a non-view, non-in-place op."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


def test_chunked_never_allocates_full_logits(monkeypatch):
    """N·K·V = 256·2·4096 = 2.1M logits; tiles of 32 tokens × 1024 vocab = 32K; d_heads K·V·H = 65K.
    The largest allocation of chunked fwd+bwd must be ≤ max(tile, d_heads, N·H); naive's is ≥ N·K·V."""
    monkeypatch.setattr(chunked_module, "TILE_ELEMENTS", 32 * 1024)
    N, H, V, K = 256, 8, 4096, 2
    hidden, heads, targets = make_inputs(N, H, V, K, torch.float32)
    grad = torch.randn(N, K)
    meters = {}
    for impl in ("naive", "chunked"):
        with LargestAllocation() as meter:
            run(impl, hidden, heads, targets, grad, chunk_size=32)
        meters[impl] = meter.largest
    assert meters["naive"] >= N * K * V
    assert meters["chunked"] <= max(32 * 1024, K * V * H, N * H), meters


def test_input_checks_and_default_impl():
    hidden, heads, targets = make_inputs(4, 3, 10, 2, torch.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        expert_logprobs(hidden, heads, targets, impl="fast")
    with pytest.raises(ValueError, match="targets must be a long tensor"):
        expert_logprobs(hidden, heads, targets.int())
    with pytest.raises(ValueError, match=r"heads \(K, V, H\)"):
        expert_logprobs(hidden, heads[:, :, :2], targets)
    with pytest.raises(ValueError, match="chunk_size"):
        expert_logprobs(hidden, heads, targets, chunk_size=0)
    assert default_impl("cpu") == "chunked"  # CUDA: Triton after its self-check (tests/kernels/test_self_check.py)
