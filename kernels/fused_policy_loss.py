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
scales the stored gradients by the upstream scalar. Elementwise work per chunk: one in-place softmax (torch's fused
kernel: max, exp and sum stay in cache row by row; measured 0.4× the time of amax, sub, exp, sum on 2 CPU cores), the
target gather, one scale pass for dz; the logits buffer is allocated once and reused (a fresh 100 MB tensor per
chunk pays its page faults again). `softmax_target_`, `loss_share` and the chunking are shared with
kernels/lowrank_fused.py.
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
    ref_logps: torch.Tensor | None = None  # (B, 2) the base head's reference log-probs when computed in the pass


def pair_chunks(pair_of_token: torch.Tensor, num_pairs: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive pair ranges [p0, p1) of about chunk_tokens response tokens each (at least one pair)."""
    counts = torch.bincount(pair_of_token, minlength=num_pairs).tolist()
    chunks, start, tokens = [], 0, 0
    for i, c in enumerate(counts):
        tokens += c
        if tokens >= chunk_tokens or i == num_pairs - 1:
            chunks.append((start, i + 1))
            start, tokens = i + 1, 0
    return chunks


def chunk_rows(rows: torch.Tensor, p0: int, p1: int, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of pairs [p0, p1): their positions idx (n_c,) and local rows (n_c,) in [0, 2b): chosen 0..b-1,
    rejected b..2b-1 (b = p1 − p0)."""
    pair = rows % num_pairs
    idx = ((pair >= p0) & (pair < p1)).nonzero(as_tuple=True)[0]  # (n_c,)
    return idx, (rows[idx] // num_pairs) * (p1 - p0) + (pair[idx] - p0)


def softmax_target_(z: torch.Tensor, index: torch.Tensor, logit_at) -> torch.Tensor:
    """z (..., V) becomes softmax(z) in place (one fused pass, no max / exp / sum temporaries); -> log p at the
    target `index` (..., 1), shape (...).

    log p_t = log(softmax(z)[t]) is exact while p_t is a normal float. Where it underflowed (z_t more than ~87 below
    the row's max in fp32), log p_t = z_t − z_v* + log p_v* with v* the row's argmax (p_v* ≥ 1/V never underflows):
    those few rows' z_t and z_v* come from `logit_at(mask, v)` -> the logits at the rows `mask` (...,) and
    columns v (rows,), recomputed from the inputs (z itself is overwritten)."""
    torch.softmax(z, -1, out=z)
    p_t = z.gather(-1, index).squeeze(-1)
    logp = p_t.log()
    info = torch.finfo(z.dtype)
    low = p_t < info.tiny / info.eps  # below this, p_t lost its relative precision (or is 0)
    if low.any():
        p_max, v_max = z[low].max(dim=-1)  # (rows,)
        t = index.squeeze(-1)[low]
        logp[low] = logit_at(low, t) - logit_at(low, v_max) + p_max.log()
    return logp


def loss_share(token_logps, local_row, p0, p1, num_pairs, ref_logps, log_w, beta, loss_kwargs):
    """The loss share of pairs [p0, p1) and its gradient to their tokens' log-probs.

    token_logps (n_c, K) of the chunk's tokens -> (share (scalar), sequence log-probs (b, 2, K), resp (b, K),
    g = d share / d token_logps (n_c, K)), all detached: autograd runs on the (b, 2, K) loss graph only."""
    from mixdpo_ds.core.losses import mixdpo_loss

    b, dtype = p1 - p0, token_logps.dtype
    seq = token_logps.new_zeros(2 * b, token_logps.shape[1]).index_add_(0, local_row, token_logps)  # (2b, K)
    seq = seq.view(2, b, -1).transpose(0, 1).detach().requires_grad_(True)  # (b, 2, K)
    if loss_kwargs.get("resp") is not None:  # given responsibilities (the Dirichlet warm-up): this chunk's rows
        loss_kwargs = {**loss_kwargs, "resp": loss_kwargs["resp"][p0:p1].to(dtype)}
    with torch.enable_grad():
        out = mixdpo_loss(seq, ref_logps.to(dtype), log_w[p0:p1].to(dtype), beta, **loss_kwargs)
        share = out.policy_loss * (b / num_pairs)  # the batch mean of per-pair terms
        (g_seq,) = torch.autograd.grad(share, seq)  # (b, 2, K)
    g_tok = g_seq.transpose(0, 1).reshape(2 * b, -1)[local_row]  # (n_c, K)
    return share.detach(), seq.detach(), out.resp.detach(), g_tok


def chunk_buffer(chunks, rows, num_pairs, per_token: int, like: torch.Tensor, dtype) -> torch.Tensor:
    """One flat buffer for the largest chunk's logits (per_token floats per token), reused by every chunk: a fresh
    100 MB tensor per chunk costs its page faults again (measured: as much as the softmax itself on a CPU)."""
    counts = torch.bincount(rows % num_pairs, minlength=num_pairs).cumsum(0).tolist()
    largest = max(counts[p1 - 1] - (counts[p0 - 1] if p0 else 0) for p0, p1 in chunks)
    return torch.empty(largest * per_token, dtype=dtype, device=like.device)


def _chunk_step(hidden, heads, targets, rows, p0, p1, num_pairs, ref_logps, log_w, beta, loss_kwargs, buffer):
    """One chunk of pairs: (its tokens' index, loss share, sequence log-probs (b, 2, K), resp (b, K), dz, h)."""
    idx, local_row = chunk_rows(rows, p0, p1, num_pairs)
    dtype = compute_dtype(hidden, heads)
    h = hidden[idx].to(dtype)  # (n_c, H)
    t = targets[idx]
    K, V, H = heads.shape
    flat = heads.to(dtype).reshape(K * V, H)
    z = torch.mm(h, flat.T, out=buffer[:idx.numel() * K * V].view(-1, K * V)).view(-1, K, V)  # (n_c, K, V)
    index = t[:, None, None].expand(-1, K, 1)

    def logit_at(mask, v):  # (n_c, K) mask, (rows,) vocabulary ids -> the logits z[mask][v]
        n, k = mask.nonzero(as_tuple=True)
        return (h[n] * heads[k, v].to(dtype)).sum(-1)

    token_logps = softmax_target_(z, index, logit_at)  # (n_c, K); z now holds softmax(z)
    share, seq, resp, g_tok = loss_share(token_logps, local_row, p0, p1, num_pairs, ref_logps[p0:p1], log_w, beta,
                                         loss_kwargs)
    dz = z.mul_(-g_tok[..., None])  # −g · softmax, in place of the logits
    dz.scatter_add_(-1, index, g_tok[..., None])
    return idx, share, seq, resp, dz, h


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
        chunks = pair_chunks(rows % B, B, chunk_tokens)
        buffer = chunk_buffer(chunks, rows, B, K * heads.shape[1], hidden, dtype)
        for p0, p1 in chunks:
            idx, share, seq, q, dz, h = _chunk_step(hidden, heads, targets, rows, p0, p1, B, ref_logps, log_w, beta,
                                                    loss_kwargs, buffer)
            loss += share
            policy_logps[p0:p1], resp[p0:p1] = seq, q
            dz = dz.view(dz.shape[0], -1)  # (n_c, K·V): both matmuls read it as is, no permuted copy
            if d_hidden is not None:
                d_hidden[idx] += dz @ heads.to(dtype).reshape(-1, heads.shape[2])
            if d_heads is not None:  # accumulated in place
                d_heads.view(-1, heads.shape[2]).addmm_(dz.T, h)
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
