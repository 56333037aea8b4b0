"""Chunked K-head log-probs in pure PyTorch: bounded memory in forward and backward (the CPU default).

logp[n, k] = z[n, k, t_n] − logsumexp_v z[n, k, v],   z[n, k, :] = heads[k] @ hidden[n]     (N, K, V never built)

The (N, V) logits of one expert are visited in (chunk_n × chunk_v) tiles. The forward keeps an online
log-sum-exp per (token, expert) over the vocabulary tiles (flash-attention style) and picks the target logit
out of the tile that holds it; it saves only the (N, K) log-sum-exp table. The backward recomputes each tile:

    d z[n, k, v] = g[n, k] · (1[v = t_n] − exp(z[n, k, v] − lse[n, k]))
    d hidden[n]  = Σ_k Σ_v d z[n, k, v] · heads[k, v]          d heads[k, v] = Σ_n d z[n, k, v] · hidden[n]

Memory bound (beyond inputs, outputs and the (N, K) tables): one logits tile of chunk_n × chunk_v ≤
max(TILE_ELEMENTS, chunk_n) elements (default 2^22 = 16 MiB in fp32) plus about two temporaries of the same
size (exp, the max/sum reductions), one fp32 (chunk_v, H) weight block (an upcast copy for 16-bit heads, or
the d_heads block accumulator), and one fp32 (N, H) copy/accumulator for hidden / d_hidden. Compute: the
forward does 2·N·H·V·K FLOPs, the backward 6·N·H·V·K (one recompute + two gradient matmuls).
"""
from __future__ import annotations

import torch

from .naive import IGNORE_INDEX, compute_dtype

TILE_ELEMENTS = 1 << 22  # logits elements per tile
DEFAULT_CHUNK_N = 1024  # tokens per tile; large enough that all three matmuls run at full CPU GEMM speed


def tile_shape(n_tokens: int, vocab: int, chunk_size: int | None = None) -> tuple[int, int]:
    """(chunk_n, chunk_v) of the logits tiles: chunk_size tokens (default 1024) × TILE_ELEMENTS / chunk_n vocab."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size!r}")
    chunk_n = max(1, min(n_tokens, chunk_size or DEFAULT_CHUNK_N))
    chunk_v = max(1, min(vocab, TILE_ELEMENTS // chunk_n))
    return chunk_n, chunk_v


def chunked_forward(
    hidden: torch.Tensor, heads: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs and log-sum-exp of K heads, tile by tile.

    hidden (N, H), heads (K, V, H), targets (N,) (-100 = ignored). Returns logps (N, K) (0 at ignored tokens)
    and lse (N, K), both in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    N, _ = hidden.shape
    K, V, _ = heads.shape
    dtype = compute_dtype(hidden, heads)
    chunk_n, chunk_v = tile_shape(N, V, chunk_size)
    hidden_c = hidden.to(dtype)  # (N, H); a copy only for 16-bit hidden
    ignored = targets == IGNORE_INDEX
    safe_targets = targets.masked_fill(ignored, 0)
    running_max = hidden_c.new_full((N, K), float("-inf"))
    running_sum = hidden_c.new_zeros((N, K))
    target_logit = hidden_c.new_zeros((N, K))
    for k in range(K):
        for v0 in range(0, V, chunk_v):
            v1 = min(v0 + chunk_v, V)
            w = heads[k, v0:v1].to(dtype)  # (Cv, H)
            for n0 in range(0, N, chunk_n):
                n1 = min(n0 + chunk_n, N)
                logits = hidden_c[n0:n1] @ w.T  # (Cn, Cv)
                _online_lse_update(logits, running_max[n0:n1, k], running_sum[n0:n1, k])
                local = safe_targets[n0:n1] - v0  # (Cn,)
                inside = (local >= 0) & (local < v1 - v0)
                picked = logits.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)  # (Cn,)
                target_logit[n0:n1, k] = torch.where(inside, picked, target_logit[n0:n1, k])
    lse = running_max + running_sum.log()  # (N, K)
    logps = (target_logit - lse).masked_fill(ignored[:, None], 0.0)
    return logps, lse


def _online_lse_update(logits: torch.Tensor, running_max: torch.Tensor, running_sum: torch.Tensor) -> None:
    """In place: (m, s) ← (max(m, max_v z), s·e^(m − m') + Σ_v e^(z − m')). logits (Cn, Cv); m, s (Cn,) views."""
    new_max = torch.maximum(running_max, logits.amax(dim=1))
    # -inf − (-inf) = nan only before the first tile, where running_sum is 0: guard the rescale factor
    scale = torch.where(running_sum > 0, (running_max - new_max).exp(), torch.zeros_like(new_max))
    tile_sum = (logits - new_max[:, None]).exp_().sum(dim=1)
    running_sum.mul_(scale).add_(tile_sum)
    running_max.copy_(new_max)


def chunked_backward(
    grad_logps: torch.Tensor, hidden: torch.Tensor, heads: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
    chunk_size: int | None = None, need_hidden: bool = True, need_heads: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d_hidden (N, H) and d_heads (K, V, H) for upstream grad_logps (N, K), recomputing the logits tiles.

    Accumulates in the compute dtype; returns gradients in the dtypes of hidden / heads (None when not needed).
    """
    N, H = hidden.shape
    K, V, _ = heads.shape
    dtype = lse.dtype
    chunk_n, chunk_v = tile_shape(N, V, chunk_size)
    hidden_c = hidden.to(dtype)
    ignored = targets == IGNORE_INDEX
    safe_targets = targets.masked_fill(ignored, 0)
    grad = grad_logps.to(dtype).masked_fill(ignored[:, None], 0.0)  # (N, K); ignored tokens contribute nothing
    d_hidden = hidden_c.new_zeros((N, H)) if need_hidden else None
    d_heads = None
    if need_heads:  # (K, V, H) in heads' dtype; the first token chunk writes every block (none when N = 0)
        d_heads = torch.empty_like(heads) if N > 0 else torch.zeros_like(heads)
    for k in range(K):
        for v0 in range(0, V, chunk_v):
            v1 = min(v0 + chunk_v, V)
            w = heads[k, v0:v1].to(dtype)  # (Cv, H)
            # fp32 heads accumulate in place; 16-bit heads in an fp32 block, cast once
            in_place = need_heads and d_heads.dtype == dtype
            d_w = d_heads[k, v0:v1] if in_place else (w.new_empty(w.shape) if need_heads else None)
            for n0 in range(0, N, chunk_n):
                n1 = min(n0 + chunk_n, N)
                g = grad[n0:n1, k]  # (Cn,)
                d_logits = torch.mm(hidden_c[n0:n1], w.T)  # (Cn, Cv), becomes d z in place
                d_logits.sub_(lse[n0:n1, k, None]).exp_().mul_(-g[:, None])
                local = safe_targets[n0:n1] - v0
                inside = (local >= 0) & (local < v1 - v0)
                d_logits.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None], (g * inside)[:, None])
                if d_hidden is not None:
                    d_hidden[n0:n1].addmm_(d_logits, w)
                if d_w is not None:  # the first token chunk overwrites (no zero fill of the (K, V, H) output)
                    d_w.addmm_(d_logits.T, hidden_c[n0:n1], beta=0.0 if n0 == 0 else 1.0)
            if need_heads and not in_place:
                d_heads[k, v0:v1].copy_(d_w)
    if d_hidden is not None:
        d_hidden = d_hidden.to(hidden.dtype)
    return d_hidden, d_heads


class ChunkedExpertLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: saves (hidden, heads, targets, lse) and recomputes the logits in backward."""

    @staticmethod
    def forward(ctx, hidden, heads, targets, chunk_size=None):
        logps, lse = chunked_forward(hidden, heads, targets, chunk_size)
        ctx.save_for_backward(hidden, heads, targets, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps):
        hidden, heads, targets, lse = ctx.saved_tensors
        d_hidden, d_heads = chunked_backward(
            grad_logps, hidden, heads, targets, lse, ctx.chunk_size,
            need_hidden=ctx.needs_input_grad[0], need_heads=ctx.needs_input_grad[1],
        )
        return d_hidden, d_heads, None, None


def expert_logprobs_chunked(
    hidden: torch.Tensor, heads: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """(N, K) fp32 log-probs of K heads with bounded memory; see the module docstring for the bound."""
    return ChunkedExpertLogprobsFunction.apply(hidden, heads, targets, chunk_size)
