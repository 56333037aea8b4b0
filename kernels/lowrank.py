"""Chunked log-probs of K low-rank expert heads that share one base head, in pure PyTorch (bounded memory).

    z[n, k, v] = W[v] · h_n + A_k[v] · u[k, n] (+ b_k[v]),   u[k, n] = B_k h_n                 (docs/math.md §16)
    logp[n, k] = z[n, k, t_n] − logsumexp_v z[n, k, v]

Symbols: N tokens, H hidden, V vocabulary, K experts, r the rank; W (V, H) the base head (`base`), A_k (V, r)
(`up`), B_k (r, H) (`down`), b_k (V,) an optional bias. With `include_base` a column K holds the base head alone
(z = W h): the reference of a frozen-trunk policy comes out of the same pass.

The shared tile W h of a (chunk_n × chunk_v) block is computed once and each expert adds its rank-r delta, so the
forward costs 2·N·H·V + 2·K·N·r·V FLOPs instead of K full heads' 2·K·N·H·V. The backward recomputes the tiles as
`kernels/chunked.py` does and sums the experts' dz before the shared matmuls:

    dz[n, k, v] = g[n, k] (1[v = t_n] − softmax(z[n, k])[v])
    dW   = Σ_k dz_k^T h          d h = Σ_k dz_k W + Σ_k du_k B_k          (one matmul each for all K)
    dA_k = dz_k^T u_k            du_k = dz_k A_k          dB_k = du_k^T h           db_k = Σ_n dz_k

so K experts cost one head plus about K·r/H of one. Memory beyond inputs and outputs: the (K, N, r) table u and
its gradient, the (N, K+1) log-sum-exp table, and a few (K, chunk_n, chunk_v) logits tiles of about TILE_ELEMENTS
(kernels/chunked.py) together: all K experts of a tile in one batched matmul, consumed in place.
"""
from __future__ import annotations

import torch

from .chunked import tile_shape
from .naive import IGNORE_INDEX, compute_dtype


def _tiles(z0, low, up_block, bias_block, n0: int, n1: int) -> torch.Tensor:
    """Logits (K, Cn, Cv) of all K experts (a new tensor): W h + A_k u_k (+ b_k), one batched matmul."""
    z = torch.baddbmm(z0.expand(up_block.shape[0], -1, -1), low[:, n0:n1], up_block.transpose(1, 2))
    return z if bias_block is None else z.add_(bias_block[:, None, :])


def _blocks(base, up, bias, v0: int, v1: int, dtype):
    """The vocabulary rows [v0, v1) of W (Cv, H), A (K, Cv, r) and b (K, Cv), in the compute dtype."""
    bias_block = bias[:, v0:v1].to(dtype) if bias is not None else None
    return base[v0:v1].to(dtype), up[:, v0:v1].to(dtype), bias_block


def _tile_shape(N: int, V: int, columns: int, chunk_size: int | None) -> tuple[int, int]:
    """kernels/chunked.py's tile, its vocabulary width divided by the K' columns computed together."""
    chunk_n, chunk_v = tile_shape(N, V, chunk_size)
    return chunk_n, max(1, chunk_v // columns)


def _pick_and_lse_(z, index, inside, run_max, run_sum, target) -> None:
    """Target logit and online log-sum-exp of tiles z (..., Cn, Cv), consumed in place (z becomes exp(z − m'));
    index, inside (Cn,) the target column in the tile; run_max, run_sum, target (..., Cn) views, updated."""
    picked = z.gather(-1, index.expand(*z.shape[:-1], 1)).squeeze(-1)
    target.copy_(torch.where(inside, picked, target))
    new_max = torch.maximum(run_max, z.amax(dim=-1))
    # -inf − (-inf) = nan only before the first tile, where run_sum is 0: guard the rescale factor
    scale = torch.where(run_sum > 0, (run_max - new_max).exp(), torch.zeros_like(new_max))
    run_sum.mul_(scale).add_(z.sub_(new_max[..., None]).exp_().sum(dim=-1))
    run_max.copy_(new_max)


def lowrank_forward(hidden, base, up, down, targets, bias=None, include_base=False, chunk_size=None):
    """-> logps (N, K'), lse (N, K'), u (K, N, r) in the compute dtype; K' = K + include_base."""
    N, _ = hidden.shape
    V = base.shape[0]
    K = up.shape[0]
    dtype = compute_dtype(hidden, base, up, down)
    columns = K + int(include_base)
    chunk_n, chunk_v = _tile_shape(N, V, columns, chunk_size)
    h = hidden.to(dtype)
    low = torch.einsum("nh,krh->knr", h, down.to(dtype)).contiguous()  # (K, N, r)
    ignored = targets == IGNORE_INDEX
    safe_targets = targets.masked_fill(ignored, 0)
    running_max = h.new_full((columns, N), float("-inf"))  # column-major: row j is expert j (K the base)
    running_sum = h.new_zeros((columns, N))
    target_logit = h.new_zeros((columns, N))
    for v0 in range(0, V, chunk_v):
        v1 = min(v0 + chunk_v, V)
        w, up_block, bias_block = _blocks(base, up, bias, v0, v1, dtype)
        for n0 in range(0, N, chunk_n):
            n1 = min(n0 + chunk_n, N)
            z0 = h[n0:n1] @ w.T  # (Cn, Cv), shared by every expert
            local = safe_targets[n0:n1] - v0
            inside = (local >= 0) & (local < v1 - v0)
            index = local.clamp(0, v1 - v0 - 1)[:, None]
            tables = running_max[:, n0:n1], running_sum[:, n0:n1], target_logit[:, n0:n1]
            _pick_and_lse_(_tiles(z0, low, up_block, bias_block, n0, n1), index, inside,
                           *(t[:K] for t in tables))
            if include_base:  # last: z0 is consumed
                _pick_and_lse_(z0, index, inside, *(t[K] for t in tables))
    lse = (running_max + running_sum.log()).T  # (N, K')
    return (target_logit.T - lse).masked_fill(ignored[:, None], 0.0), lse, low


def _dlogits_(z, lse, g, index, inside):
    """dz = g (1[v = t] − exp(z − lse)) in place of z (..., Cn, Cv); lse, g (..., Cn)."""
    dz = z.sub_(lse[..., None]).exp_().mul_(-g[..., None])
    return dz.scatter_add_(-1, index.expand(*z.shape[:-1], 1), (g * inside)[..., None])


def lowrank_backward(grad_logps, hidden, base, up, down, targets, bias, lse, low, chunk_size, needs):
    """Gradients (hidden, base, up, down, bias) for upstream grad_logps (N, K'); None where `needs[i]` is False."""
    N, H = hidden.shape
    V = base.shape[0]
    K = up.shape[0]
    need_hidden, need_base, need_up, need_down, need_bias = needs
    dtype = lse.dtype
    include_base = lse.shape[1] > K and (need_base or need_hidden)  # the base column reaches only W and h
    chunk_n, chunk_v = _tile_shape(N, V, K + int(include_base), chunk_size)
    h = hidden.to(dtype)
    ignored = targets == IGNORE_INDEX
    safe_targets = targets.masked_fill(ignored, 0)
    grad = grad_logps.to(dtype).masked_fill(ignored[:, None], 0.0).T.contiguous()  # (K', N)
    lse = lse.T.contiguous()  # (K', N)
    d_h = h.new_zeros((N, H)) if need_hidden else None
    d_base = h.new_zeros((V, H)) if need_base else None
    d_up = h.new_zeros(up.shape) if need_up else None
    d_low = h.new_zeros(low.shape) if (need_down or need_hidden) else None  # (K, N, r)
    d_bias = h.new_zeros((K, V)) if need_bias else None
    for v0 in range(0, V, chunk_v):
        v1 = min(v0 + chunk_v, V)
        w, up_block, bias_block = _blocks(base, up, bias, v0, v1, dtype)
        for n0 in range(0, N, chunk_n):
            n1 = min(n0 + chunk_n, N)
            z0 = h[n0:n1] @ w.T  # (Cn, Cv)
            local = safe_targets[n0:n1] - v0
            inside = (local >= 0) & (local < v1 - v0)
            index = local.clamp(0, v1 - v0 - 1)[:, None]
            dz = _dlogits_(_tiles(z0, low, up_block, bias_block, n0, n1), lse[:K, n0:n1], grad[:K, n0:n1], index,
                           inside)  # (K, Cn, Cv)
            if d_up is not None:
                d_up[:, v0:v1].baddbmm_(dz.transpose(1, 2), low[:, n0:n1])
            if d_low is not None:
                d_low[:, n0:n1].baddbmm_(dz, up_block)
            if d_bias is not None:
                d_bias[:, v0:v1].add_(dz.sum(1))
            if not (need_base or need_hidden):
                continue
            dz_sum = dz.sum(0)  # (Cn, Cv): W and h see the experts' dz summed (and the base column's)
            if include_base:
                dz_sum.add_(_dlogits_(z0, lse[K, n0:n1], grad[K, n0:n1], index, inside))
            if d_base is not None:
                d_base[v0:v1].addmm_(dz_sum.T, h[n0:n1])
            if d_h is not None:
                d_h[n0:n1].addmm_(dz_sum, w)
    d_down = torch.einsum("knr,nh->krh", d_low, h).to(down.dtype) if need_down else None
    if d_h is not None:
        d_h = d_h.add_(torch.einsum("knr,krh->nh", d_low, down.to(dtype))).to(hidden.dtype)
    cast = [(d_base, base), (d_up, up), (d_bias, bias)]
    d_base, d_up, d_bias = (d if d is None else d.to(like.dtype) for d, like in cast)
    return d_h, d_base, d_up, d_down, d_bias


class LowRankLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: saves the inputs, the log-sum-exp table and u = B h; the backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, hidden, base, up, down, targets, bias=None, include_base=False, chunk_size=None):
        logps, lse, low = lowrank_forward(hidden, base, up, down, targets, bias, include_base, chunk_size)
        ctx.save_for_backward(hidden, base, up, down, targets, bias, lse, low)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps):
        hidden, base, up, down, targets, bias, lse, low = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 5))
        d_h, d_base, d_up, d_down, d_bias = lowrank_backward(grad_logps, hidden, base, up, down, targets, bias, lse,
                                                             low, ctx.chunk_size, needs)
        return d_h, d_base, d_up, d_down, None, d_bias, None, None


def lowrank_logprobs_chunked(hidden, base, up, down, targets, bias=None, include_base=False, chunk_size=None):
    """(N, K) or (N, K + 1) fp32 log-probs of K low-rank heads with bounded memory (module docstring)."""
    return LowRankLogprobsFunction.apply(hidden, base, up, down, targets, bias, include_base, chunk_size)
