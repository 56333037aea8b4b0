"""K-head log-probs and the Mix-DPO policy loss with its gradients in one pass, chunk of pairs by chunk of pairs:
no logits recompute, memory of one chunk's (n_c, K, V) logits (docs/math.md §4, §16).

Why it is exact: given log w (held fixed: the E-step's q and the corrected margin's sg(·) carry no gradient),
L_policy = −(1/B) Σ_i Σ_k q_ik ℓ(m_ik) is a sum of per-pair terms, and pair i's term depends only on its own
sequence log-probs lp_i±k. So one chunk of pairs (all their response tokens) can compute its logits, its log-probs,
its share of the loss, d L / d lp (by autograd on the tiny (b, 2, K) loss graph), and then, from the logits it still
holds, the token gradients dz = g (1[v = t] − softmax(z)) and their matmuls into d hidden and d heads, as
Liger-Kernel's fused linear losses do. The gate-level terms that couple pairs (L_gate, λ_global KL(w̄‖U)) read only
log w and q: the caller computes them from the returned `resp`.

FLOPs: 2·N·H·V·K for the logits and 4·N·H·V·K for the two gradient matmuls, as naive (chunked: 8). The backward only
scales the stored gradients by the upstream scalar.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .naive import IGNORE_INDEX, compute_dtype

# logits per chunk by default (128 MiB fp32): chunk_tokens = CHUNK_ELEMENTS // (K · V). Each chunk adds into the
# (K, V, H) d_heads once, so smaller chunks pay more passes over it: 1 << 24 measured 1.2x naive's time at V = 50,257.
CHUNK_ELEMENTS = 1 << 25


class FusedPolicyLoss(NamedTuple):
    policy_loss: torch.Tensor  # scalar, differentiable to hidden and heads
    policy_logps: torch.Tensor  # (B, 2, K) sequence log-probs, detached
    resp: torch.Tensor  # (B, K) responsibilities q, detached (for the gate loss)


def _pair_chunks(pair_of_token: torch.Tensor, num_pairs: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive pair ranges [p0, p1) of about chunk_tokens response tokens each (at least one pair)."""
    counts = torch.bincount(pair_of_token, minlength=num_pairs).tolist()
    chunks, start, tokens = [], 0, 0
    for i, c in enumerate(counts):
        tokens += c
        if tokens >= chunk_tokens or i == num_pairs - 1:
            chunks.append((start, i + 1))
            start, tokens = i + 1, 0
    return chunks


def _chunk_step(hidden, heads, targets, rows, p0, p1, num_pairs, ref_logps, log_w, beta, loss_kwargs):
    """One chunk of pairs: (its tokens' index, loss share, sequence log-probs (b, 2, K), resp (b, K), dz, h)."""
    B, b = num_pairs, p1 - p0
    pair = rows % B
    idx = ((pair >= p0) & (pair < p1)).nonzero(as_tuple=True)[0]  # (n_c,)
    dtype = compute_dtype(hidden, heads)
    h = hidden[idx].to(dtype)  # (n_c, H)
    t = targets[idx]
    local_row = (rows[idx] // B) * b + (pair[idx] - p0)  # chosen rows 0..b-1, rejected b..2b-1
    K, V, H = heads.shape
    z = (h @ heads.to(dtype).reshape(K * V, H).T).view(-1, K, V)  # (n_c, K, V), the chunk's one logits buffer
    index = t[:, None, None].expand(-1, K, 1)
    picked = z.gather(-1, index)  # (n_c, K, 1)
    top = z.amax(dim=-1, keepdim=True)
    total = z.sub_(top).exp_().sum(dim=-1, keepdim=True)  # z now holds exp(z − max): no temporary
    lse = top + total.log()  # (n_c, K, 1)
    token_logps = (picked - lse).squeeze(-1)  # (n_c, K)
    seq = token_logps.new_zeros(2 * b, z.shape[1]).index_add_(0, local_row, token_logps)  # (2b, K)
    seq = seq.view(2, b, -1).transpose(0, 1).detach().requires_grad_(True)  # (b, 2, K)
    from mixdpo_ds.core.losses import mixdpo_loss

    if loss_kwargs.get("resp") is not None:  # given responsibilities (the Dirichlet warm-up): this chunk's rows
        loss_kwargs = {**loss_kwargs, "resp": loss_kwargs["resp"][p0:p1].to(dtype)}
    with torch.enable_grad():
        out = mixdpo_loss(seq, ref_logps[p0:p1].to(dtype), log_w[p0:p1].to(dtype), beta, **loss_kwargs)
        share = out.policy_loss * (b / B)  # the batch mean of per-pair terms
        (g_seq,) = torch.autograd.grad(share, seq)  # (b, 2, K)
    g_tok = g_seq.transpose(0, 1).reshape(2 * b, -1)[local_row]  # (n_c, K)
    dz = z.mul_(-g_tok[..., None] / total)  # softmax · (−g), in place of the logits
    dz.scatter_add_(-1, index, g_tok[..., None])
    return idx, share.detach(), seq.detach(), out.resp.detach(), dz, h


class FusedPolicyLossFunction(torch.autograd.Function):
    """forward computes the loss and stores d loss / d (hidden, heads); backward scales them by the upstream grad."""

    @staticmethod
    def forward(ctx, hidden, heads, targets, rows, ref_logps, log_w, beta, chunk_tokens, loss_kwargs):
        B = ref_logps.shape[0]
        K = heads.shape[0]
        dtype = compute_dtype(hidden, heads)
        need_hidden, need_heads = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_hidden else None
        d_heads = torch.zeros(heads.shape, dtype=dtype, device=heads.device) if need_heads else None
        loss = torch.zeros((), dtype=dtype, device=hidden.device)
        policy_logps = torch.zeros(B, 2, K, dtype=dtype, device=hidden.device)
        resp = torch.zeros(B, K, dtype=dtype, device=hidden.device)
        for p0, p1 in _pair_chunks(rows % B, B, chunk_tokens):
            idx, share, seq, q, dz, h = _chunk_step(hidden, heads, targets, rows, p0, p1, B, ref_logps, log_w, beta,
                                                    loss_kwargs)
            loss += share
            policy_logps[p0:p1], resp[p0:p1] = seq, q
            dz = dz.view(dz.shape[0], -1)  # (n_c, K·V): both matmuls read it as is, no permuted copy
            if d_hidden is not None:
                d_hidden[idx] += dz @ heads.to(dtype).reshape(-1, heads.shape[2])
            if d_heads is not None:  # accumulated in place
                d_heads.view(-1, heads.shape[2]).addmm_(dz.T, h)
            del dz, h  # before the next chunk allocates its logits: one chunk alive at a time
        ctx.save_for_backward(d_hidden, d_heads)
        ctx.dtypes = hidden.dtype, heads.dtype
        ctx.mark_non_differentiable(policy_logps, resp)
        return loss, policy_logps, resp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_logps, _grad_resp):
        d_hidden, d_heads = ctx.saved_tensors
        # in place: the stored gradients are used once (once_differentiable), no second (K, V, H) buffer
        d_hidden = None if d_hidden is None else d_hidden.mul_(grad_loss).to(ctx.dtypes[0])
        d_heads = None if d_heads is None else d_heads.mul_(grad_loss).to(ctx.dtypes[1])
        return d_hidden, d_heads, None, None, None, None, None, None, None


def fused_policy_loss(hidden, heads, targets, rows, ref_logps, log_w, beta, chunk_tokens=None, **loss_kwargs):
    """Mix-DPO policy loss of K full heads over response tokens, without materialising (N, K, V) or recomputing.

    Args:
        hidden: (N, H) response-token hidden states; heads: (K, V, H); targets: (N,) next-token ids (no -100: pass
            response tokens only, as `sequence_logps` selects them).
        rows: (N,) the batch row of each token, in [0, 2B): rows 0..B-1 chosen, B..2B-1 rejected (docs/ARCHITECTURE.md).
        ref_logps: (B, 2) or (B, 2, K); log_w: (B, K) or (K,) gate log-weights, no gradient through this loss.
        beta, loss_kwargs: as `mixdpo_ds.core.losses.mixdpo_loss` (exact E-step: posterior_correction,
            label_smoothing, estep, resp).
        chunk_tokens: response tokens per chunk of whole pairs (default CHUNK_ELEMENTS // (K · V)): memory ≈
            chunk · K · V floats for the logits, plus the (K, V, H) and (N, H) gradient accumulators.
    Returns:
        FusedPolicyLoss(policy_loss, policy_logps (B, 2, K), resp (B, K)); the gate loss is the caller's (from resp).
    """
    if loss_kwargs.get("mode", "exact") != "exact":
        raise ValueError("fused_policy_loss: only mode='exact' is separable over pairs (Gumbel samples reach the gate)")
    if (targets == IGNORE_INDEX).any():
        raise ValueError("fused_policy_loss: targets must be response tokens only (no -100)")
    B = ref_logps.shape[0]
    log_w = log_w.detach().expand(B, heads.shape[0])
    default_chunk = max(1, CHUNK_ELEMENTS // (heads.shape[0] * heads.shape[1]))
    loss, policy_logps, resp = FusedPolicyLossFunction.apply(hidden, heads, targets, rows, ref_logps.detach(), log_w,
                                                             beta, chunk_tokens or default_chunk, loss_kwargs)
    return FusedPolicyLoss(loss, policy_logps, resp)
