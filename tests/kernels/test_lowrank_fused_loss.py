"""fused_lowrank_policy_loss (kernels/lowrank_fused.py): K low-rank heads' log-probs + Mix-DPO policy loss + every
gradient in one pass per chunk of pairs (no recompute), against the naive twin (lowrank_logprobs naive → per-row
sums → mixdpo_loss) in fp64: loss, sequence log-probs, responsibilities, the in-pass reference, all five gradients;
zero deltas equal the base head (the full-head fused loss); an underflowed target probability; bounded memory."""
import pytest
import torch
from kernel_reference import SLACK_ULPS
from mixdpo_ds.kernels import fused_lowrank_policy_loss, fused_policy_loss, lowrank_logprobs
from test_expert_logprobs_chunked import LargestAllocation

from mixdpo_ds.core.losses import dpo_loss, mixdpo_loss

NAMES = ("hidden", "base", "up", "down", "bias")


def make_batch(B, H, V, K, r, dtype=torch.float64, seed=0, bias=True):
    """Response tokens of 2B rows with 1-6 tokens each (rows 0..B-1 chosen, B..2B-1 rejected), O(1) logit deltas."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (2 * B,), generator=g)
    rows = torch.repeat_interleave(torch.arange(2 * B), lengths)
    N = rows.numel()
    tensors = {"hidden": torch.randn(N, H, generator=g), "base": torch.randn(V, H, generator=g) * 2 / H**0.5,
               "up": torch.randn(K, V, r, generator=g) / r**0.5, "down": torch.randn(K, r, H, generator=g) / H**0.5,
               "bias": torch.randn(K, V, generator=g) * 0.3 if bias else None}
    tensors = {n: None if t is None else t.to(dtype) for n, t in tensors.items()}
    targets = torch.randint(0, V, (N,), generator=g)
    ref = -3 * lengths.view(2, B).T.to(dtype) + torch.randn(B, 2, generator=g).to(dtype)
    log_w = torch.log_softmax(torch.randn(K, generator=g), -1).to(dtype).expand(B, K)
    return tensors, targets, rows, ref, log_w


def naive(hidden, base, up, down, targets, rows, ref, log_w, beta, bias=None, **kw):
    """The same signature as fused_lowrank_policy_loss, by materialising every logit (plain autograd)."""
    B, K = log_w.shape
    token = lowrank_logprobs(hidden, base, up, down, targets, bias=bias, include_base=ref is None, impl="naive")
    seq = token.new_zeros(2 * B, token.shape[1]).index_add(0, rows, token).view(2, B, -1).transpose(0, 1)
    ref_out = None if ref is not None else seq[..., K].detach()  # (B, 2): the base column
    out = mixdpo_loss(seq[..., :K], ref if ref is not None else ref_out, log_w.detach(), beta, **kw)
    return out.policy_loss, seq[..., :K], out.resp, ref_out


def run(fn, tensors, targets, rows, ref, log_w, beta, trains=NAMES, **kw):
    leaves = {n: None if t is None else t.detach().clone().requires_grad_(n in trains) for n, t in tensors.items()}
    out = fn(leaves["hidden"], leaves["base"], leaves["up"], leaves["down"], targets, rows, ref, log_w, beta,
             bias=leaves["bias"], **kw)
    (3.0 * out[0]).backward()  # an upstream gradient that is not 1
    res = {"loss": out[0].detach(), "policy_logps": out[1].detach(), "resp": out[2].detach()}
    if out[3] is not None:
        res["ref_logps"] = out[3]
    res.update({f"d_{n}": t.grad for n, t in leaves.items() if t is not None and n in trains})
    return res


@pytest.mark.parametrize("chunk_tokens", [1, 7, 10_000])  # one pair per chunk; a few pairs; the whole batch
@pytest.mark.parametrize("given_ref, bias", [(True, True), (False, True), (False, False)])
def test_matches_naive_fp64(chunk_tokens, given_ref, bias):
    tensors, targets, rows, ref, log_w = make_batch(5, 6, 23, 3, 2, bias=bias)
    kw = dict(posterior_correction=0, label_smoothing=0.1) if given_ref else {}
    expected = run(naive, tensors, targets, rows, ref if given_ref else None, log_w, 0.5, **kw)
    out = run(fused_lowrank_policy_loss, tensors, targets, rows, ref if given_ref else None, log_w, 0.5,
              chunk_tokens=chunk_tokens, **kw)
    assert out.keys() == expected.keys()
    assert ("ref_logps" in out) != given_ref and ("d_bias" in out) == bias
    for name in expected:
        torch.testing.assert_close(out[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("trains", [("up", "down"), ("up", "down", "bias"), ("hidden",), ("base", "up")])
def test_only_some_inputs_train(trains):
    """Frozen trunk (only A, B train), or only some inputs: the gradients that exist equal naive's, the rest None."""
    tensors, targets, rows, _, log_w = make_batch(4, 5, 17, 2, 3, seed=2)
    expected = run(naive, tensors, targets, rows, None, log_w, 0.2, trains=trains)
    out = run(fused_lowrank_policy_loss, tensors, targets, rows, None, log_w, 0.2, trains=trains, chunk_tokens=5)
    assert out.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(out[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_fp32_no_worse_than_naive_and_given_resp():
    """fp32 inputs: the error against fp64 is no worse than naive's in fp32 (+ a few ulps), every output; the
    Dirichlet warm-up's given responsibilities are used per chunk."""
    tensors, targets, rows, _, log_w = make_batch(6, 16, 300, 3, 4, seed=1)
    resp = torch.distributions.Dirichlet(torch.ones(3)).sample((6,)).double()
    as32 = {n: None if t is None else t.float() for n, t in tensors.items()}
    expected = run(naive, tensors, targets, rows, None, log_w, 0.1, resp=resp)
    base = run(naive, as32, targets, rows, None, log_w.float(), 0.1, resp=resp.float())
    out = run(fused_lowrank_policy_loss, as32, targets, rows, None, log_w.float(), 0.1, resp=resp.float(),
              chunk_tokens=5)
    for name, want in expected.items():
        assert out[name].dtype == base[name].dtype, name
        err = (out[name].double() - want).abs().max().item()
        err_naive = (base[name].double() - want).abs().max().item()
        assert err <= err_naive + SLACK_ULPS * torch.finfo(torch.float32).eps * want.abs().max().item(), name


def test_zero_deltas_equal_the_base_head_and_k1_is_dpo():
    """A = 0, b = 0: every expert is W, so the loss and the gradients to h and W equal the full-head fused loss with
    K copies of W; K = 1 is DPO against the in-pass reference."""
    tensors, targets, rows, ref, log_w = make_batch(4, 5, 19, 3, 2, seed=3, bias=False)
    tensors["up"] = torch.zeros_like(tensors["up"])
    low = run(fused_lowrank_policy_loss, tensors, targets, rows, ref, log_w, 0.3, trains=("hidden", "base"))
    h, w = (tensors[n].clone().requires_grad_(True) for n in ("hidden", "base"))
    full = fused_policy_loss(h, w.expand(3, -1, -1), targets, rows, ref, log_w, 0.3)
    (3.0 * full.policy_loss).backward()
    torch.testing.assert_close(low["loss"], full.policy_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(low["d_hidden"], h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(low["d_base"], w.grad, rtol=1e-10, atol=1e-12)
    one, targets, rows, _, _ = make_batch(4, 5, 19, 1, 2, seed=4)
    out = run(fused_lowrank_policy_loss, one, targets, rows, None, torch.zeros(4, 1, dtype=torch.float64), 0.3)
    lp, r = out["policy_logps"][..., 0], out["ref_logps"]
    torch.testing.assert_close(out["loss"], dpo_loss(lp[:, 0], lp[:, 1], r[:, 0], r[:, 1], 0.3)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_underflowed_target_probability(dtype):
    """A target logit far below its row's max (p_t underflows to 0): log p_t still equals naive's z_t − lse."""
    tensors, targets, rows, _, log_w = make_batch(3, 4, 11, 2, 2, dtype=dtype, seed=5)
    tensors["bias"][:, targets[0]] = -2000.0 if dtype == torch.float64 else -200.0
    expected = run(naive, tensors, targets, rows, None, log_w, 0.1)
    out = run(fused_lowrank_policy_loss, tensors, targets, rows, None, log_w, 0.1)
    assert expected["policy_logps"].min() < (-1000 if dtype == torch.float64 else -150)
    for name in expected:
        torch.testing.assert_close(out[name], expected[name], msg=name)


def test_memory_is_one_chunk_of_logits():
    """N·K·V logits never exist: the largest allocation is the reused chunk buffer of K·V per token; a chunk stops
    at its first pair reaching 8 tokens, so it holds ≤ 7 + 12 tokens (a pair has up to 2 × 6)."""
    tensors, targets, rows, _, log_w = make_batch(16, 4, 2000, 2, 2, dtype=torch.float32, seed=6)
    N, K, V = rows.numel(), 2, 2000
    sizes = {}
    for name, fn, kw in (("naive", naive, {}), ("fused", fused_lowrank_policy_loss, {"chunk_tokens": 8})):
        with LargestAllocation() as meter:
            run(fn, tensors, targets, rows, None, log_w, 0.1, **kw)
        sizes[name] = meter.largest
    assert sizes["naive"] >= N * K * V
    assert sizes["fused"] <= 19 * K * V, sizes


def test_refusals():
    tensors, targets, rows, ref, log_w = make_batch(2, 3, 9, 2, 2)
    args = [tensors[n] for n in ("hidden", "base", "up", "down")]
    with pytest.raises(ValueError, match="mode='exact'"):
        fused_lowrank_policy_loss(*args, targets, rows, ref, log_w, 0.1, mode="gumbel")
    with pytest.raises(ValueError, match=r"log_w as \(B, K\)"):
        fused_lowrank_policy_loss(*args, targets, rows, None, log_w[0], 0.1)
    targets[0] = -100
    with pytest.raises(ValueError, match="response tokens only"):
        fused_lowrank_policy_loss(*args, targets, rows, ref, log_w, 0.1)
