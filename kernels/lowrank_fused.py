"""K low-rank expert heads' log-probs and the Mix-DPO policy loss with all gradients in one pass, chunk of pairs by
chunk of pairs: no logits recompute (docs/math.md §16, "No recompute"; the full-head twin is
kernels/fused_policy_loss.py, whose argument for exactness holds here unchanged: given log w the policy loss is a
sum of per-pair terms).

Per chunk of whole pairs (n_c tokens), with the chunk's tile held from the logits to the gradients:

    z0 = h W^T (n_c, V), once;   z_k = z0 + u_k A_k^T (+ b_k),  u_k = h B_k^T (n_c, r);   p_k = softmax(z_k) in place
    lp[n, k] = log p_k[n, t_n]  ->  the chunk's loss share and g[n, k] = d L / d lp[n, k]  (autograd on (b, 2, K))
    dz_k = g_k (1[v = t] − p_k), never formed: its row scale g folds into the skinny factors,
    dA_k = −p_k^T (g_k u_k) + scatter_t(g_k u_k)      du_k = g_k (A_k[t] − p_k A_k)      dB_k = du_k^T h
    db_k = −g_k^T p_k + scatter_t(g_k)                 s = Σ_k g_k p_k (one pass, only if W or h trains)
    dW = −s^T h + scatter_t((Σ_k g_k) h)              dh = −s W + (Σ_k g_k) W[t] + Σ_k du_k B_k

So each expert's tile is written once (the batched matmul), softmaxed once in place and read by two rank-r
matmuls; the frozen-trunk reference (ref_logps=None) is the base tile z0's own log-softmax, from the same pass.
Memory: one reused buffer of (K + 1) · n_c · V floats (n_c ≈ CHUNK_ELEMENTS / (K · V) tokens, whole pairs) plus the
gradient accumulators; the backward scales the stored gradients by the upstream scalar.
"""
from __future__ import annotations

import torch

from .fused_policy_loss import (
    FusedPolicyLoss,
    chunk_buffer,
    chunk_rows,
    loss_share,
    pair_chunks,
    softmax_target_,
)
from .naive import IGNORE_INDEX, compute_dtype

# logits per chunk by default (64 MiB fp32 for K experts, plus the base tile): chunk_tokens = CHUNK_ELEMENTS // (K·V).
# The accumulators are small here (K, V, r), so smaller chunks than the full-head kernel's cost little.
CHUNK_ELEMENTS = 1 << 24


def _logits(h, w, up, bias, low, z0_buf, z_buf):
    """z0 = h W^T (n_c, V) and z_k = z0 + u_k A_k^T (+ b_k) (K, n_c, V), written into the reused buffers."""
    n, V, K = h.shape[0], w.shape[0], up.shape[0]
    z0 = torch.mm(h, w.T, out=z0_buf[:n * V].view(n, V))
    z = torch.baddbmm(z0.expand(K, -1, -1), low, up.transpose(1, 2), out=z_buf[:K * n * V].view(K, n, V))
    return z0, (z if bias is None else z.add_(bias[:, None, :]))


def _lowrank_grads(p, g, t, h, w, up, down, low, with_base_terms, grads, idx):
    """Accumulate this chunk's gradients into `grads` (module docstring) from p (K, n_c, V) = softmax, g (K, n_c);
    p0's buffer (the base tile, consumed) is reused for s = Σ_k g_k p_k."""
    d_h, d_base, d_up, d_down, d_bias = grads
    gu = g[..., None] * low  # (K, n_c, r)
    if d_up is not None:
        d_up.baddbmm_(p.transpose(1, 2), gu, alpha=-1.0).index_add_(1, t, gu)
    if d_bias is not None:
        d_bias[:, None].baddbmm_(g[:, None, :], p, alpha=-1.0)
        d_bias.index_add_(1, t, g)
    d_h_chunk = None
    if d_down is not None or d_h is not None:
        du = up[:, t].sub_(torch.bmm(p, up)).mul_(g[..., None])  # (K, n_c, r)
        if d_down is not None:
            d_down.baddbmm_(du.transpose(1, 2), h.expand(up.shape[0], -1, -1))
        if d_h is not None:
            d_h_chunk = torch.einsum("knr,krh->nh", du, down)
    if with_base_terms is not None:  # W or h trains: dz summed over the experts
        s = torch.mul(p[0], g[0, :, None], out=with_base_terms)  # (n_c, V)
        for k in range(1, p.shape[0]):
            s.addcmul_(p[k], g[k, :, None])
        g_sum = g.sum(0)  # (n_c,)
        if d_base is not None:
            d_base.addmm_(s.T, h, alpha=-1.0).index_add_(0, t, g_sum[:, None] * h)
        if d_h is not None:
            d_h_chunk = d_h_chunk.sub_(s @ w).add_(g_sum[:, None] * w[t])
    if d_h_chunk is not None:
        d_h.index_add_(0, idx, d_h_chunk)


def _chunk_step(inputs, chunk, buffers, grads, loss_args):
    """One chunk of pairs: -> (loss share, sequence log-probs (b, 2, K), resp (b, K), ref_logps (b, 2) or None);
    the gradients are added into `grads`."""
    hidden, w, up, down, bias, targets, rows = inputs
    p0, p1, B = chunk
    ref_logps, log_w, beta, loss_kwargs = loss_args
    idx, local_row = chunk_rows(rows, p0, p1, B)
    h, t = hidden[idx].to(w.dtype), targets[idx]  # (n_c, H), (n_c,)
    low = torch.einsum("nh,krh->knr", h, down)  # (K, n_c, r)
    z0, z = _logits(h, w, up, bias, low, *buffers)
    K, n = up.shape[0], idx.numel()

    def logit_at(mask, v):  # (K, n_c) mask, (rows,) vocabulary ids -> z[mask][v], recomputed
        k, i = mask.nonzero(as_tuple=True)
        out = (h[i] * w[v]).sum(-1) + (low[k, i] * up[k, v]).sum(-1)
        return out if bias is None else out + bias[k, v]

    token_logps = softmax_target_(z, t.expand(K, n)[..., None], logit_at)  # (K, n_c); z now holds p
    ref_seq = None
    if ref_logps is None:  # the base head's own log-probs: the frozen-trunk reference, no gradient
        base_tok = softmax_target_(z0, t[:, None], lambda mask, v: (h[mask] * w[v]).sum(-1))  # (n_c,)
        ref_seq = base_tok.new_zeros(2 * (p1 - p0)).index_add_(0, local_row, base_tok).view(2, -1).T  # (b, 2)
        ref_chunk = ref_seq
    else:
        ref_chunk = ref_logps[p0:p1]
    share, seq, resp, g_tok = loss_share(token_logps.T, local_row, p0, p1, B, ref_chunk, log_w, beta, loss_kwargs)
    with_base = z0 if (grads[0] is not None or grads[1] is not None) else None
    _lowrank_grads(z, g_tok.T.contiguous(), t, h, w, up, down, low, with_base, grads, idx)
    return share, seq, resp, ref_seq


class FusedLowRankLossFunction(torch.autograd.Function):
    """forward computes the loss and stores d loss / d (hidden, base, up, down, bias); backward scales them."""

    @staticmethod
    def forward(ctx, hidden, base, up, down, bias, targets, rows, ref_logps, log_w, beta, chunk_tokens, loss_kwargs):
        B, K, V = log_w.shape[0], up.shape[0], base.shape[0]
        dtype = compute_dtype(hidden, base, up, down)
        w, up_c, down_c = base.to(dtype), up.to(dtype), down.to(dtype)  # copies only for 16-bit weights
        bias_c = None if bias is None else bias.to(dtype)
        needs = [ctx.needs_input_grad[i] for i in range(5)]
        grads = [torch.zeros(x.shape, dtype=dtype, device=hidden.device) if need else None
                 for x, need in zip((hidden, base, up, down, bias), needs, strict=True)]
        loss = torch.zeros((), dtype=dtype, device=hidden.device)
        policy_logps = torch.zeros(B, 2, K, dtype=dtype, device=hidden.device)
        resp = torch.zeros(B, K, dtype=dtype, device=hidden.device)
        ref_out = torch.zeros(B, 2, dtype=dtype, device=hidden.device) if ref_logps is None else None
        chunks = pair_chunks(rows % B, B, chunk_tokens)
        buffers = (chunk_buffer(chunks, rows, B, V, hidden, dtype), chunk_buffer(chunks, rows, B, K * V, hidden, dtype))
        inputs = hidden, w, up_c, down_c, bias_c, targets, rows
        for p0, p1 in chunks:
            share, seq, q, ref_seq = _chunk_step(inputs, (p0, p1, B), buffers, grads,
                                                 (ref_logps, log_w, beta, loss_kwargs))
            loss += share
            policy_logps[p0:p1], resp[p0:p1] = seq, q
            if ref_out is not None:
                ref_out[p0:p1] = ref_seq
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.have = [g is not None for g in grads]
        ctx.dtypes = [None if x is None else x.dtype for x in (hidden, base, up, down, bias)]
        outs = (policy_logps, resp) + (() if ref_out is None else (ref_out,))
        ctx.mark_non_differentiable(*outs)
        return loss, policy_logps, resp, ref_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        saved = iter(ctx.saved_tensors)
        # in place: the stored gradients are used once (once_differentiable)
        grads = [next(saved).mul_(grad_loss).to(dtype) if have else None
                 for have, dtype in zip(ctx.have, ctx.dtypes, strict=True)]
        return (*grads, None, None, None, None, None, None, None)


def fused_lowrank_policy_loss(hidden, base, up, down, targets, rows, ref_logps, log_w, beta, bias=None,
                              chunk_tokens=None, **loss_kwargs) -> FusedPolicyLoss:
    """Mix-DPO policy loss of K low-rank heads W + A_k B_k (+ b_k) over response tokens, no recompute.

    Args:
        hidden: (N, H) response-token hidden states; base: (V, H) the shared head W; up: (K, V, r) A_k;
            down: (K, r, H) B_k; bias: (K, V) or None; targets: (N,) next-token ids (response tokens only, no -100).
        rows: (N,) each token's batch row in [0, 2B): rows 0..B-1 chosen, B..2B-1 rejected.
        ref_logps: (B, 2) or (B, 2, K) reference sequence log-probs, or None: the base head's own, computed from the
            shared tile in the same pass (the frozen-trunk reference; no gradient) and returned as `ref_logps`.
        log_w: (B, K) or (K,) gate log-weights (no gradient through this loss); beta, loss_kwargs: as
            `mixdpo_ds.core.losses.mixdpo_loss` (mode exact only: posterior_correction, label_smoothing, estep, resp).
        chunk_tokens: response tokens per chunk of whole pairs (default CHUNK_ELEMENTS // (K · V)).
    Returns:
        FusedPolicyLoss(policy_loss, policy_logps (B, 2, K), resp (B, K), ref_logps (B, 2) or None); gradients reach
        hidden, base, up, down, bias in their dtypes where they require grad.
    """
    if loss_kwargs.get("mode", "exact") != "exact":
        raise ValueError("fused_lowrank_policy_loss: only mode='exact' is separable over pairs (Gumbel samples reach "
                         "the gate)")
    if (targets == IGNORE_INDEX).any():
        raise ValueError("fused_lowrank_policy_loss: targets must be response tokens only (no -100)")
    K, V = up.shape[0], base.shape[0]
    if ref_logps is None and log_w.dim() != 2:
        raise ValueError("fused_lowrank_policy_loss: with ref_logps=None pass log_w as (B, K) (it gives the batch B)")
    B = log_w.shape[0] if ref_logps is None else ref_logps.shape[0]
    log_w = log_w.detach().expand(B, K)
    ref_logps = None if ref_logps is None else ref_logps.detach()
    default_chunk = max(1, CHUNK_ELEMENTS // (K * V))
    loss, policy_logps, resp, ref_out = FusedLowRankLossFunction.apply(
        hidden, base, up, down, bias, targets, rows, ref_logps, log_w, beta, chunk_tokens or default_chunk,
        loss_kwargs)
    return FusedPolicyLoss(loss, policy_logps, resp, ref_out)
