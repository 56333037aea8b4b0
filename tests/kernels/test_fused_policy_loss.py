"""fused_policy_loss (kernels/fused_policy_loss.py): K-head log-probs + Mix-DPO policy loss + gradients in one pass
per chunk of pairs, against its naive twin (expert_logprobs naive → per-row sums → mixdpo_loss) in fp64: the loss,
the sequence log-probs, the responsibilities and both gradients; bounded memory; K = 1 is DPO."""
import pytest
import torch
from mixdpo_ds.kernels import expert_logprobs, fused_policy_loss
from test_expert_logprobs_chunked import LargestAllocation

from mixdpo_ds.core.losses import dpo_loss, mixdpo_loss


def make_batch(B, H, V, K, dtype=torch.float64, seed=0):
    """Response tokens of 2B rows with 1-6 tokens each; rows 0..B-1 chosen, B..2B-1 rejected."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (2 * B,), generator=g)
    rows = torch.repeat_interleave(torch.arange(2 * B), lengths)
    N = rows.numel()
    hidden = torch.randn(N, H, generator=g).to(dtype)
    heads = (torch.randn(K, V, H, generator=g) * 2 / H**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    ref = -3 * lengths.view(2, B).T.to(dtype) + torch.randn(B, 2, generator=g).to(dtype)
    log_w = torch.log_softmax(torch.randn(K, generator=g), -1).to(dtype).expand(B, K)
    return hidden, heads, targets, rows, ref, log_w


def naive(hidden, heads, targets, rows, ref, log_w, beta, **kw):
    B, K = ref.shape[0], heads.shape[0]
    token = expert_logprobs(hidden, heads, targets, impl="naive")  # (N, K)
    seq = token.new_zeros(2 * B, K).index_add(0, rows, token).view(2, B, K).transpose(0, 1)  # (B, 2, K)
    out = mixdpo_loss(seq, ref, log_w.detach(), beta, **kw)
    return out.policy_loss, seq, out.resp


def run(fn, hidden, heads, targets, rows, ref, log_w, beta, **kw):
    h, w = hidden.clone().requires_grad_(True), heads.clone().requires_grad_(True)
    out = fn(h, w, targets, rows, ref, log_w, beta, **kw)
    (3.0 * out[0]).backward()  # an upstream gradient that is not 1
    return {"loss": out[0].detach(), "policy_logps": out[1].detach(), "resp": out[2].detach(), "d_hidden": h.grad,
            "d_heads": w.grad}


@pytest.mark.parametrize("chunk_tokens", [1, 7, 10_000])  # one pair per chunk; a few pairs; the whole batch
@pytest.mark.parametrize("kw", [dict(), dict(posterior_correction=0, label_smoothing=0.1)])
def test_matches_naive_fp64(chunk_tokens, kw):
    inputs = make_batch(5, 6, 23, 3)
    ref = run(naive, *inputs, 0.5, **kw)
    out = run(fused_policy_loss, *inputs, 0.5, chunk_tokens=chunk_tokens, **kw)
    assert out.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_fp32_no_worse_than_naive_and_given_resp():
    inputs64 = make_batch(6, 16, 200, 2, seed=1)
    inputs32 = [t.float() if t.is_floating_point() else t for t in inputs64]
    resp = torch.distributions.Dirichlet(torch.ones(2)).sample((6,)).double()
    ref = run(naive, *inputs64, 0.1, resp=resp)
    base = run(naive, *inputs32, 0.1, resp=resp.float())
    out = run(fused_policy_loss, *inputs32, 0.1, resp=resp.float(), chunk_tokens=5)
    for name, expected in ref.items():
        err = (out[name].double() - expected).abs().max().item()
        err_naive = (base[name].double() - expected).abs().max().item()
        assert err <= err_naive + 4 * torch.finfo(torch.float32).eps * expected.abs().max().item(), name
    assert out["d_hidden"].dtype == out["d_heads"].dtype == torch.float32


def test_k1_is_dpo():
    hidden, heads, targets, rows, ref, _ = make_batch(4, 5, 17, 1)
    out = run(fused_policy_loss, hidden, heads, targets, rows, ref, torch.zeros(4, 1, dtype=torch.float64), 0.3)
    lp = out["policy_logps"][..., 0]
    torch.testing.assert_close(out["loss"], dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], 0.3)[0])


def test_memory_is_one_chunk_of_logits():
    """N·K·V logits never exist: the largest allocation is one chunk's (n_c, K, V) or d_heads (K, V, H)."""
    hidden, heads, targets, rows, ref, log_w = make_batch(16, 4, 2000, 2, dtype=torch.float32)
    N, K, V = hidden.shape[0], 2, 2000
    sizes = {}
    for name, fn, kw in (("naive", naive, {}), ("fused", fused_policy_loss, {"chunk_tokens": 8})):
        with LargestAllocation() as meter:
            run(fn, hidden, heads, targets, rows, ref, log_w, 0.1, **kw)
        sizes[name] = meter.largest
    assert sizes["naive"] >= N * K * V
    assert sizes["fused"] <= max(14 * K * V, K * V * 4), sizes  # a chunk holds whole pairs: ≤ 8 + 6 tokens


def test_refuses_gumbel_and_ignored_targets():
    hidden, heads, targets, rows, ref, log_w = make_batch(2, 3, 9, 2)
    with pytest.raises(ValueError, match="mode='exact'"):
        fused_policy_loss(hidden, heads, targets, rows, ref, log_w, 0.1, mode="gumbel")
    targets[0] = -100
    with pytest.raises(ValueError, match="response tokens only"):
        fused_policy_loss(hidden, heads, targets, rows, ref, log_w, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_underflowed_target_probability(dtype):
    """A target far below its row's max (softmax underflows to 0 there): log p_t still equals naive's z_t − lse,
    from the row's argmax (kernels/fused_policy_loss.py `softmax_target_`)."""
    hidden, heads, targets, rows, ref, log_w = make_batch(3, 4, 11, 2, dtype=dtype, seed=5)
    heads[1, targets[0]] = -hidden[0] * (3000.0 if dtype == torch.float64 else 300.0) / hidden[0].square().sum()
    expected = run(naive, hidden, heads, targets, rows, ref, log_w, 0.1)
    out = run(fused_policy_loss, hidden, heads, targets, rows, ref, log_w, 0.1)
    assert expected["policy_logps"].min() < (-1000 if dtype == torch.float64 else -150)
    for name in expected:
        torch.testing.assert_close(out[name], expected[name], msg=name)
