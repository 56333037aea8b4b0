"""Naive twins of the fused kernels: same signatures, plain PyTorch autograd, the test reference.

`expert_logprobs_naive` materialises the full (N, K, V) logits; it is the reference every other
implementation is compared with (run in fp64 by the tests) and the baseline of the benchmark.
`mbt_loss_naive` is `mixdpo_ds.core.losses.mixdpo_loss` itself (docs/math.md §2–§6 live there).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 when any input is fp64 (the test reference)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def expert_logprobs_naive(
    hidden: torch.Tensor, heads: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-token log-probs of K expert heads, materialising all logits.

    logp[n, k] = log_softmax(heads[k] @ hidden[n])[targets[n]], 0 where targets[n] == -100.

    Args:
        hidden: (N, H) trunk hidden states of the response tokens, any float dtype.
        heads: (K, V, H) stacked expert LM-head weights.
        targets: (N,) long next-token ids, -100 for ignored tokens.
        chunk_size: unused (kept so every impl has one signature).
    Returns:
        (N, K) log-probs in fp32 (fp64 for fp64 inputs). Memory: the (N, K, V) logits and their
        log-softmax are kept for autograd.
    """
    del chunk_size
    dtype = compute_dtype(hidden, heads)
    logits = torch.einsum("nh,kvh->nkv", hidden.to(dtype), heads.to(dtype))  # (N, K, V)
    logps = logits.log_softmax(dim=-1)  # (N, K, V)
    ignored = targets == IGNORE_INDEX  # (N,)
    index = targets.masked_fill(ignored, 0)[:, None, None].expand(-1, heads.shape[0], 1)  # (N, K, 1)
    token_logps = logps.gather(-1, index).squeeze(-1)  # (N, K)
    return token_logps.masked_fill(ignored[:, None], 0.0)


def mbt_loss_naive(*args, **kwargs):
    """`mixdpo_ds.core.losses.mixdpo_loss` (plain autograd); same signature and return type."""
    from mixdpo_ds.core.losses import mixdpo_loss

    return mixdpo_loss(*args, **kwargs)


def lowrank_logprobs_naive(
    hidden: torch.Tensor, base: torch.Tensor, up: torch.Tensor, down: torch.Tensor, targets: torch.Tensor,
    bias: torch.Tensor | None = None, include_base: bool = False, chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token log-probs of K low-rank expert heads sharing one base head, materialising all logits.

    z[n, k, :] = base @ h_n + up[k] @ (down[k] @ h_n) (+ bias[k]);  logp[n, k] = log_softmax(z[n, k])[t_n]

    Args:
        hidden: (N, H); base: (V, H) the shared head W; up: (K, V, r) A_k; down: (K, r, H) B_k;
        targets: (N,) long, -100 ignored; bias: (K, V) or None.
        include_base: append column K, the log-probs of the base head alone (the frozen-trunk reference).
        chunk_size: unused (one signature for every impl).
    Returns:
        (N, K) or (N, K + 1) in fp32 (fp64 for fp64 inputs), 0 where targets == -100.
    """
    del chunk_size
    dtype = compute_dtype(hidden, base, up, down)
    h = hidden.to(dtype)
    base_logits = h @ base.to(dtype).T  # (N, V)
    low = torch.einsum("nh,krh->nkr", h, down.to(dtype))  # (N, K, r)
    logits = base_logits[:, None] + torch.einsum("nkr,kvr->nkv", low, up.to(dtype))  # (N, K, V)
    if bias is not None:
        logits = logits + bias.to(dtype)
    if include_base:
        logits = torch.cat([logits, base_logits[:, None]], dim=1)  # (N, K + 1, V)
    logps = logits.log_softmax(dim=-1)
    ignored = targets == IGNORE_INDEX
    index = targets.masked_fill(ignored, 0)[:, None, None].expand(-1, logits.shape[1], 1)  # (N, K', 1)
    return logps.gather(-1, index).squeeze(-1).masked_fill(ignored[:, None], 0.0)
