"""Triton K-head log-probs: logits tiles of all K heads from one hidden tile, online log-sum-exp, recomputing
backward; deterministic (every output element has one writer, no atomics).

    z[n, k, v] = heads[k, v] · hidden[n]            (never stored: (BLOCK_N, K_PAD·BLOCK_V) tiles)
    logp[n, k] = z[n, k, t_n] − lse[n, k],  lse[n, k] = logsumexp_v z[n, k, v]       (0 where t_n = −100)
    dz[n, k, v] = g[n, k] (1[v = t_n] − exp(z[n, k, v] − lse[n, k]))
    d hidden[n] = Σ_k Σ_v dz[n, k, v] heads[k, v]     d heads[k, v] = Σ_n dz[n, k, v] hidden[n]

Symbols: N tokens, H hidden, V vocabulary, K heads (padded to K_PAD, a power of two). A tile's columns are the
K_PAD·BLOCK_V rows r = k·BLOCK_V + j of the stacked heads, row j of vocabulary tile v0 of head k, so one load
of a (BLOCK_N, BLOCK_H) hidden tile feeds the dot products of all K heads.

Kernels: forward (grid: token blocks × vocabulary splits; the host combines the splits' partial log-sum-exps and
target logits) → (N, K) logps and lse; backward d_hidden (grid: token blocks × vocabulary splits, the partial
sums added on the host in a fixed order) and d_heads (grid: vocabulary blocks, loops over tokens); each backward
kernel recomputes its logits tiles, so a step costs 2 + 2·(2 + 2) = 10 N·H·V·K FLOPs (6 with materialised logits).
Accumulation in fp32 (d_hidden / d_heads in fp32 scratch, cast once). fp32 inputs: every dot in IEEE fp32 (no
TF32). 16-bit inputs: logits by the native 16-bit dot (exact products); the gradient dots multiply the fp32 dz
by the upcast operand in TF32 (dz keeps 10 mantissa bits, not bf16's 7: rounding dz to bf16, as flash-attention
does, measured 2.7x naive's d_hidden error here).

This module runs `@triton.jit` at import: import it through `mixdpo_ds.kernels.triton_module` after
TRITON_INTERPRET is set (the interpreter runs these kernels on CPU tensors).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import IGNORE_INDEX

POISON = False  # tests: fill outputs with NaN before the kernels write them, to catch unwritten elements
VOCAB_SPLIT = None  # vocabulary splits of the forward and d_hidden kernels; None: 1 under the interpreter, else
# enough to fill the GPU (`_vocab_split`)


@triton.jit
def _dot(a, b, acc, FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, fp32 accumulation. FP32: multiply fp32 copies at PRECISION ("ieee" | "tf32"); products of
    16-bit operands are exact in fp32. Else the native 16-bit tensor-core dot."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _logits_tile(hidden_ptr, heads_ptr, offs_n, mask_n, r_k, cols, mask_r, H, stride_hn, stride_wk, stride_wv,
                 BLOCK_N: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, LOGIT_FP32: tl.constexpr):
    """(BLOCK_N, R) fp32 logits of tokens offs_n against stacked-head rows (r_k, cols); hidden tiles loaded once."""
    acc = tl.zeros((BLOCK_N, R), dtype=tl.float32)
    w_rows = heads_ptr + r_k.to(tl.int64) * stride_wk + cols.to(tl.int64) * stride_wv  # (R,) row pointers
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        x = tl.load(hidden_ptr + offs_n[:, None].to(tl.int64) * stride_hn + offs_h[None, :],
                    mask=mask_n[:, None] & mask_h[None, :], other=0.0)  # (BLOCK_N, BLOCK_H)
        w = tl.load(w_rows[:, None] + offs_h[None, :], mask=mask_r[:, None] & mask_h[None, :], other=0.0)  # (R, BH)
        acc = _dot(x, tl.trans(w), acc, LOGIT_FP32, "ieee")
    return acc


@triton.jit
def _dlogits_tile(z, lse, g, tgt, cols, mask_r, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """dz = g (onehot − exp(z − lse)) for a (BLOCK_N, R) tile; lse, g (BLOCK_N, K_PAD); 0 on padded rows."""
    p = tl.exp(tl.reshape(z, (BLOCK_N, K_PAD, BLOCK_V)) - lse[:, :, None])
    hit = tl.reshape(cols[None, :] == tgt[:, None], (BLOCK_N, K_PAD, BLOCK_V))
    dz = g[:, :, None] * (hit.to(tl.float32) - p)
    dz = tl.reshape(dz, (BLOCK_N, K_PAD * BLOCK_V))
    return tl.where(mask_r[None, :], dz, 0.0)


@triton.jit
def _expert_logprobs_fwd_kernel(
    hidden_ptr, heads_ptr, targets_ptr, lse_part_ptr, tgt_part_ptr, N, V, H, stride_hn, stride_wk, stride_wv,
    split_len, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, GRAD_PRECISION: tl.constexpr, LOGIT_FP32: tl.constexpr,
):
    """Partial log-sum-exp and target logit (BLOCK_N, K) of one token block over one vocabulary split
    (program_id(1)); the host combines the splits: lse = logsumexp over splits, target logit = sum over splits."""
    R: tl.constexpr = K_PAD * BLOCK_V
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(targets_ptr + offs_n, mask=mask_n, other=-100)
    offs_r = tl.arange(0, R)
    r_k = offs_r // BLOCK_V
    offs_k = tl.arange(0, K_PAD)
    run_max = tl.full((BLOCK_N, K_PAD), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N, K_PAD), dtype=tl.float32)
    tgt_logit = tl.zeros((BLOCK_N, K_PAD), dtype=tl.float32)
    v_start = tl.program_id(1) * split_len
    for v0 in range(0, split_len, BLOCK_V):  # the first tile of a split has columns < V; later ones may not
        cols = v_start + v0 + offs_r % BLOCK_V
        mask_r = (r_k < K) & (cols < V)
        z = _logits_tile(hidden_ptr, heads_ptr, offs_n, mask_n, r_k, cols, mask_r, H, stride_hn, stride_wk,
                         stride_wv, BLOCK_N, R, BLOCK_H, LOGIT_FP32)
        # padded vocabulary → -inf (no mass); padded heads → 0 (finite, never stored)
        z = tl.where(mask_r[None, :], z, tl.where(r_k[None, :] < K, float("-inf"), 0.0))
        z3 = tl.reshape(z, (BLOCK_N, K_PAD, BLOCK_V))
        new_max = tl.maximum(run_max, tl.max(z3, axis=2))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z3 - new_max[:, :, None]), axis=2)
        run_max = new_max
        hit = (cols[None, :] == tgt[:, None]) & mask_r[None, :]
        tgt_logit += tl.sum(tl.reshape(tl.where(hit, z, 0.0), (BLOCK_N, K_PAD, BLOCK_V)), axis=2)
    out = tl.program_id(1).to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
    mask_out = mask_n[:, None] & (offs_k[None, :] < K)
    tl.store(lse_part_ptr + out, run_max + tl.log(run_sum), mask=mask_out)
    tl.store(tgt_part_ptr + out, tgt_logit, mask=mask_out)


@triton.jit
def _load_lse_grad(lse_ptr, grad_ptr, offs_n, mask_n, tgt, K: tl.constexpr, K_PAD: tl.constexpr):
    """lse and upstream grad (BLOCK_N, K_PAD); grad 0 on ignored tokens and padding."""
    offs_k = tl.arange(0, K_PAD)
    idx = offs_n[:, None] * K + offs_k[None, :]
    mask = mask_n[:, None] & (offs_k[None, :] < K)
    lse = tl.load(lse_ptr + idx, mask=mask, other=0.0)
    g = tl.load(grad_ptr + idx, mask=mask & (tgt != -100)[:, None], other=0.0)
    return lse, g


@triton.jit
def _expert_logprobs_bwd_hidden_kernel(
    hidden_ptr, heads_ptr, targets_ptr, lse_ptr, grad_ptr, d_hidden_ptr, N, V, H, stride_hn, stride_wk,
    stride_wv, split_len, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, GRAD_PRECISION: tl.constexpr, LOGIT_FP32: tl.constexpr,
):
    """Partial d_hidden (N, H) fp32 of one token block over one vocabulary split (program_id(1)): Σ over its
    vocabulary tiles, read-modify-write by the only owner; the host sums the splits (fixed order)."""
    R: tl.constexpr = K_PAD * BLOCK_V
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(targets_ptr + offs_n, mask=mask_n, other=-100)
    lse, g = _load_lse_grad(lse_ptr, grad_ptr, offs_n, mask_n, tgt, K, K_PAD)
    offs_r = tl.arange(0, R)
    r_k = offs_r // BLOCK_V
    v_start = tl.program_id(1) * split_len
    d_hidden_ptr += tl.program_id(1).to(tl.int64) * N * H
    for v0 in range(0, split_len, BLOCK_V):  # the last split's tiles past V are fully masked
        cols = v_start + v0 + offs_r % BLOCK_V
        mask_r = (r_k < K) & (cols < V)
        z = _logits_tile(hidden_ptr, heads_ptr, offs_n, mask_n, r_k, cols, mask_r, H, stride_hn, stride_wk,
                         stride_wv, BLOCK_N, R, BLOCK_H, LOGIT_FP32)
        dz = _dlogits_tile(z, lse, g, tgt, cols, mask_r, BLOCK_N, K_PAD, BLOCK_V)
        w_rows = heads_ptr + r_k.to(tl.int64) * stride_wk + cols.to(tl.int64) * stride_wv
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            w = tl.load(w_rows[:, None] + offs_h[None, :], mask=mask_r[:, None] & mask_h[None, :], other=0.0)
            ptrs = d_hidden_ptr + offs_n[:, None].to(tl.int64) * H + offs_h[None, :]
            mask = mask_n[:, None] & mask_h[None, :]
            acc = tl.load(ptrs, mask=mask & (v0 > 0), other=0.0)  # (BLOCK_N, BLOCK_H)
            tl.store(ptrs, _dot(dz, w, acc, True, GRAD_PRECISION), mask=mask)


@triton.jit
def _expert_logprobs_bwd_heads_kernel(
    hidden_ptr, heads_ptr, targets_ptr, lse_ptr, grad_ptr, d_heads_ptr, N, V, H, stride_hn, stride_wk,
    stride_wv, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, GRAD_PRECISION: tl.constexpr, LOGIT_FP32: tl.constexpr,
):
    """d_heads (K, V, H) fp32 for one vocabulary tile of all heads: Σ over token blocks, one owner per row."""
    R: tl.constexpr = K_PAD * BLOCK_V
    offs_r = tl.arange(0, R)
    r_k = offs_r // BLOCK_V
    cols = tl.program_id(0) * BLOCK_V + offs_r % BLOCK_V
    mask_r = (r_k < K) & (cols < V)
    d_rows = d_heads_ptr + (r_k.to(tl.int64) * V + cols) * H  # (R,) row pointers of the contiguous output
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        tgt = tl.load(targets_ptr + offs_n, mask=mask_n, other=-100)
        lse, g = _load_lse_grad(lse_ptr, grad_ptr, offs_n, mask_n, tgt, K, K_PAD)
        z = _logits_tile(hidden_ptr, heads_ptr, offs_n, mask_n, r_k, cols, mask_r, H, stride_hn, stride_wk,
                         stride_wv, BLOCK_N, R, BLOCK_H, LOGIT_FP32)
        dz = _dlogits_tile(z, lse, g, tgt, cols, mask_r, BLOCK_N, K_PAD, BLOCK_V)
        dz_t = tl.trans(dz)  # (R, BLOCK_N)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            x = tl.load(hidden_ptr + offs_n[:, None].to(tl.int64) * stride_hn + offs_h[None, :],
                        mask=mask_n[:, None] & mask_h[None, :], other=0.0)
            ptrs = d_rows[:, None] + offs_h[None, :]
            mask = mask_r[:, None] & mask_h[None, :]
            acc = tl.load(ptrs, mask=mask & (n0 > 0), other=0.0)  # (R, BLOCK_H)
            tl.store(ptrs, _dot(dz_t, x, acc, True, GRAD_PRECISION), mask=mask)


# ----------------------------------------------------------------------------- host side

_INTERPRETED = type(_expert_logprobs_fwd_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at import


def _meta(K: int, dtype: torch.dtype) -> dict:
    """Compile-time arguments. The interpreter wants few large tiles (it pays per op), the GPU register-sized
    ones: R = K_PAD·BLOCK_V stacked-head rows per tile."""
    k_pad = triton.next_power_of_2(K)
    fp32 = dtype == torch.float32
    # the interpreter multiplies bf16 dot operands as their raw uint16 bits (np.matmul in create_dot): fp32 it is
    meta = dict(K=K, K_PAD=k_pad, LOGIT_FP32=fp32 or _INTERPRETED, GRAD_PRECISION="ieee" if fp32 else "tf32")
    if _INTERPRETED:
        return dict(meta, BLOCK_N=64, BLOCK_V=max(16, 1024 // k_pad), BLOCK_H=64)
    return dict(meta, BLOCK_N=64, BLOCK_V=max(16, 128 // k_pad), BLOCK_H=64)


def _vocab_split(N: int, V: int, meta: dict, like: torch.Tensor) -> tuple[int, int, int]:
    """(token blocks, vocabulary splits, split length) of the kernels that walk the vocabulary per token block.
    Split the vocabulary when there are too few token blocks to fill the GPU (2 programs per SM), at most 16 ways;
    every split starts inside the vocabulary."""
    n_blocks, v_tiles = triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(V, meta["BLOCK_V"])
    split = VOCAB_SPLIT
    if split is None:
        sms = 0 if _INTERPRETED else torch.cuda.get_device_properties(like.device).multi_processor_count
        split = max(1, min(16, triton.cdiv(2 * sms, n_blocks)))
    tiles_per_split = triton.cdiv(v_tiles, min(split, v_tiles))
    return n_blocks, triton.cdiv(v_tiles, tiles_per_split), tiles_per_split * meta["BLOCK_V"]


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=like.device)
    return torch.empty(shape, dtype=torch.float32, device=like.device)


def _prepare(hidden: torch.Tensor, heads: torch.Tensor):
    """One float dtype for both operands of tl.dot; contiguous last dimension."""
    dtype = torch.promote_types(hidden.dtype, heads.dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"impl='triton' takes fp32 / bf16 / fp16 inputs, got {hidden.dtype} and {heads.dtype}")
    hidden = hidden.to(dtype)
    heads = heads.to(dtype)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    heads = heads if heads.stride(-1) == 1 else heads.contiguous()
    return hidden, heads


def expert_logprobs_forward(hidden, heads, targets):
    """hidden (N, H), heads (K, V, H), targets (N,) → logps (N, K) fp32, lse (N, K) fp32."""
    hidden, heads = _prepare(hidden, heads)
    (N, H), (K, V, _) = hidden.shape, heads.shape
    meta = _meta(K, hidden.dtype)
    n_blocks, split, split_len = _vocab_split(N, V, meta, hidden)
    lse_part, tgt_part = _empty((split, N, K), hidden), _empty((split, N, K), hidden)
    _expert_logprobs_fwd_kernel[(n_blocks, split)](hidden, heads, targets.contiguous(), lse_part, tgt_part, N, V, H,
                                                   hidden.stride(0), heads.stride(0), heads.stride(1), split_len,
                                                   **meta)
    lse = torch.logsumexp(lse_part, dim=0)  # (N, K); exact for one split
    logps = (tgt_part.sum(0) - lse).masked_fill((targets == IGNORE_INDEX)[:, None], 0.0)
    return logps, lse


def expert_logprobs_backward(grad_logps, hidden, heads, targets, lse, need_hidden=True, need_heads=True):
    """d_hidden (N, H) and d_heads (K, V, H) in the input dtypes (None when not needed), fp32 accumulation."""
    hidden_in, heads_in = hidden, heads
    hidden, heads = _prepare(hidden, heads)
    (N, H), (K, V, _) = hidden.shape, heads.shape
    meta = _meta(K, hidden.dtype)
    grad = grad_logps.to(torch.float32).contiguous()
    targets = targets.contiguous()
    args = (N, V, H, hidden.stride(0), heads.stride(0), heads.stride(1))
    d_hidden = d_heads = None
    if need_hidden:
        n_blocks, split, split_len = _vocab_split(N, V, meta, hidden)
        partial = _empty((split, N, H), hidden)
        _expert_logprobs_bwd_hidden_kernel[(n_blocks, split)](hidden, heads, targets, lse, grad, partial, *args,
                                                              split_len, **meta)
        d_hidden = (partial[0] if split == 1 else partial.sum(0)).to(hidden_in.dtype)
    if need_heads:
        d_heads = _empty((K, V, H), hidden)
        grid = (triton.cdiv(V, meta["BLOCK_V"]),)
        _expert_logprobs_bwd_heads_kernel[grid](hidden, heads, targets, lse, grad, d_heads, *args, **meta)
        d_heads = d_heads.to(heads_in.dtype)
    return d_hidden, d_heads


class ExpertLogprobsFunction(torch.autograd.Function):
    """Saves (hidden, heads, targets, lse); the backward kernels recompute the logits tiles."""

    @staticmethod
    def forward(ctx, hidden, heads, targets):
        logps, lse = expert_logprobs_forward(hidden, heads, targets)
        ctx.save_for_backward(hidden, heads, targets, lse)
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps):
        hidden, heads, targets, lse = ctx.saved_tensors
        d_hidden, d_heads = expert_logprobs_backward(grad_logps, hidden, heads, targets, lse,
                                                     ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return d_hidden, d_heads, None


def expert_logprobs_triton(hidden, heads, targets, chunk_size=None):
    """(N, K) fp32 log-probs of K heads by the Triton kernels (chunk_size is unused: tiles are fixed)."""
    del chunk_size
    assert IGNORE_INDEX == -100  # the kernels hard-code -100
    return ExpertLogprobsFunction.apply(hidden, heads, targets)
