"""The policy loss inside the heads' forward, no logits recompute (`loss.fused`, docs/math.md §16).

Given log w, L_policy is a sum of per-pair terms, so the heads' forward can compute each chunk of pairs' log-probs,
loss share and gradients from the logits it still holds (kernels/fused_policy_loss.py for dense heads,
kernels/lowrank_fused.py for low-rank heads). The gate must therefore run *before* the heads: its log w is a function
of the prompt features that the same forward produces, passed as `FusedLoss.log_w` and called inside it. Everything
else of Algorithm 1 is unchanged: the trainer still runs the E-step on the returned (detached) log-probs for the
gate's loss, the margins and the metrics (a (B, 2, K) computation), and the gate's step reads the same record.

Where it applies: `experts.kind=heads`, dense (K, V, H) or low-rank heads, `experts.ep_size=1`, not the tied K = 1
head, `em.mode=exact` (Gumbel samples carry the gate's gradient: not separable), `loss.rpo_alpha=0` (the NLL term
reads the log-probs outside), pairs (rankings take the PyTorch path), and `experts.logprob_impl` chunked, or auto off
CUDA (naive stays the materialising twin; the Triton full-head kernel keeps its own path on a GPU).
"""
from __future__ import annotations

import torch

FUSED_MODES = ("auto", "always", "never")


def fused_unsupported(cfg, policy, device, ranked: bool = False) -> str | None:
    """Why `loss.fused` cannot apply to this run, or None when it can (the module docstring's list)."""
    e = cfg.experts
    if ranked:
        return "ranked data (the Plackett-Luce loss reads m responses; docs/math.md §15)"
    if e.kind != "heads":
        return f"experts.kind={e.kind!r} (heads only)"
    if e.ep_size > 1:
        return f"experts.ep_size={e.ep_size} (dense heads only)"
    if policy.tied_head:
        return "the tied K = 1 head (its head is the input embedding, read outside the heads)"
    if cfg.em.mode != "exact":
        return f"em.mode={cfg.em.mode!r} (Gumbel samples carry the gate's gradient)"
    if cfg.loss.rpo_alpha != 0:
        return f"loss.rpo_alpha={cfg.loss.rpo_alpha} (the NLL term reads the log-probs outside the heads)"
    impl = e.logprob_impl
    if impl in ("naive", "triton"):
        return f"experts.logprob_impl={impl!r} (its own path)"
    if impl == "auto" and e.head_rank is None and torch.device(device).type == "cuda":
        return "experts.logprob_impl='auto' on CUDA (the Triton kernel)"
    return None


def resolve_fused(cfg, policy, device, ranked: bool = False) -> bool:
    """Whether the trainer uses the fused loss: `loss.fused` auto (where it applies), always (or an error naming the
    reason), never."""
    reason = fused_unsupported(cfg, policy, device, ranked)
    if cfg.loss.fused == "always" and reason is not None:
        raise ValueError(f"loss.fused='always' cannot apply: {reason}; use loss.fused=auto or never")
    return cfg.loss.fused != "never" and reason is None


class GateCall:
    """log_w for `FusedLoss`: `gate(features (2B, H) | None) -> (B, K)` called inside the heads' forward; keeps the
    value for the step's record (the gate is not called twice)."""

    def __init__(self, gate):
        self.gate, self.log_w = gate, None

    def __call__(self, features: torch.Tensor | None) -> torch.Tensor:
        self.log_w = self.gate(features)
        return self.log_w
