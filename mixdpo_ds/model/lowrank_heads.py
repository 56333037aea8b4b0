"""Low-rank expert heads sharing the base head (`experts.head_rank: r`, docs/math.md §16).

Expert k's LM head is W + A_k B_k: W (V, H) the base model's own head (frozen with a frozen trunk, where it is
also the reference; trained, and kept tied to the input embedding where the model ties them, with a trainable
trunk), A_k (V, r) `up`, B_k (r, H) `down`. The kernel `lowrank_logprobs` computes the shared tile W h once per
vocabulary block and adds each expert's rank-r delta, so K experts cost about one head plus K·r/H of one, and
a frozen trunk's reference log-probs come out of the same pass (the base column).

Initialisation: B_k ~ N(0, 1/H) and A_k ~ N(0, s²) with s = init_noise · std(W) · sqrt(H / r), so the delta logit
A_k B_k h has the variance of the full heads' init noise (init_noise · std(W))² · |h|²; init_noise = 0 gives
A_k = 0, i.e. K copies of the base head (B_k still differ, so the first gradients of A_k already differ).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn

from mixdpo_ds.model.hf_lm import response_tokens, sequence_logps, sum_per_row


class FusedLoss(NamedTuple):
    """What a `heads` policy's forward needs to return the Mix-DPO policy loss itself (the no-recompute kernels
    `fused_lowrank_policy_loss` / `fused_policy_loss`, docs/math.md §16): the loss is separable over pairs given
    log w, so each chunk of pairs takes its gradients from the logits it still holds."""
    log_w: torch.Tensor | Callable  # (B, K) gate log-weights, or a function of the prompt features (2B, H) -> (B, K)
    ref_logps: torch.Tensor | None  # (B, 2) or (B, 2, K); None: the frozen base head's own, from the same pass
    beta: float
    loss_kwargs: dict               # mixdpo_loss's exact-mode options (posterior_correction, label_smoothing, ...)


class LowRankHeads(nn.Module):
    """up (K, V, r) and down (K, r, H): the experts' deltas on a base head held elsewhere (passed to forward)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        if up.dim() != 3 or down.dim() != 3 or up.shape[0] != down.shape[0] or up.shape[2] != down.shape[1]:
            raise ValueError(f"expected up (K, V, r) and down (K, r, H), got {tuple(up.shape)} and {tuple(down.shape)}")
        self.up = nn.Parameter(up)
        self.down = nn.Parameter(down)

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    @torch.no_grad()
    def dense(self, base: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Expert k's full head W + A_k B_k (V, H), or all K of them (K, V, H) when k is None; in fp32 then cast."""
        up = self.up if k is None else self.up[k:k + 1]
        down = self.down if k is None else self.down[k:k + 1]
        heads = base.float() + torch.einsum("kvr,krh->kvh", up.float(), down.float())       # (K or 1, V, H)
        heads = heads.to(base.dtype)
        return heads if k is None else heads[0]

    def forward(self, hidden: torch.Tensor, base: torch.Tensor, labels: torch.Tensor, include_base: bool,
                impl: str = "auto", chunk_size: int | None = None, loss: FusedLoss | None = None):
        """(2B, T, H), (V, H), (2B, T) -> (2B, K) fp32 sums over response tokens, or (2B, K + 1) with the base
        head's own log-probs in column K (include_base). impl "auto" runs the chunked PyTorch path (the Triton
        kernel has no low-rank variant yet). With `loss` (log_w resolved to a (B, K) tensor): the FusedPolicyLoss
        of `fused_lowrank_policy_loss` instead, its reference from the base column when loss.ref_logps is None.
        A module forward, not a plain method: ZeRO-3 gathers up / down (and the external base head,
        `register_heads_for_zero3`) around it."""
        from mixdpo_ds.kernels import fused_lowrank_policy_loss, lowrank_logprobs  # lazy: keeps `import experts` light

        rows, token_hidden, targets = response_tokens(hidden, labels)
        if loss is not None:
            return fused_lowrank_policy_loss(token_hidden, base, self.up, self.down, targets, rows, loss.ref_logps,
                                             loss.log_w, loss.beta, **loss.loss_kwargs)
        impl = "naive" if impl == "naive" else "chunked"
        token_logps = lowrank_logprobs(token_hidden, base, self.up, self.down, targets, include_base=include_base,
                                       impl=impl, chunk_size=chunk_size)                     # (N, K or K + 1)
        return sum_per_row(token_logps, rows, hidden.shape[0])


def build_lowrank_heads(head: torch.Tensor, num_experts: int, rank: int, init_noise: float,
                        generator: torch.Generator) -> LowRankHeads:
    """K deltas for the base head (V, H), drawn from `generator` (module docstring: the initialisation)."""
    V, H = head.shape
    if not 1 <= rank <= H:
        raise ValueError(f"experts.head_rank={rank}: must be in [1, hidden size {H}]")
    down = torch.randn(num_experts, rank, H, generator=generator) / H**0.5                  # (K, r, H)
    scale = init_noise * float(head.detach().float().std()) * (H / rank) ** 0.5
    up = torch.randn(num_experts, V, rank, generator=generator) * scale                     # (K, V, r)
    return LowRankHeads(up.to(head.dtype).to(head.device), down.to(head.dtype).to(head.device))


def fused_heads_loss(hidden, labels, features, loss: FusedLoss, *, lowrank: LowRankHeads | None,
                     heads: torch.Tensor | None, shared_head: torch.Tensor | None, frozen_ref: bool, chunk_size=None):
    """A `heads` policy's loss from the no-recompute kernels (docs/math.md §16), called inside its forward (ZeRO-3:
    heads exist only inside their owner's forward; low-rank deltas are `lowrank`'s, so they run in its forward).

    hidden (2B, T, H), labels (2B, T), features (2B, H) or None (the gate's input when loss.log_w is a function);
    lowrank or dense heads (K, V, H); shared_head W (V, H); frozen_ref: W on a frozen trunk is the reference.
    -> (logps (2B, K) detached, ref_logps (2B,) or None, policy_loss, resp (B, K))."""
    from mixdpo_ds.kernels import fused_policy_loss  # lazy: keeps `import experts` light

    log_w = loss.log_w(features) if callable(loss.log_w) else loss.log_w                     # (B, K)
    if loss.ref_logps is None and not frozen_ref:
        raise ValueError("MixturePolicy.forward(loss=...): ref_logps=None needs the built-in reference of a "
                         "frozen-trunk heads policy (experts.trunk=frozen); pass ref_logps")
    loss = loss._replace(log_w=log_w)
    if lowrank is not None:
        res = lowrank(hidden, shared_head, labels, frozen_ref, loss=loss)
    elif heads is not None:
        ref = loss.ref_logps
        if ref is None:  # the frozen base head's reference, chunked (no gradient)
            with torch.no_grad():
                ref = sequence_logps(hidden, shared_head.unsqueeze(0), labels, "chunked", chunk_size)[:, 0]
            ref = ref.view(2, -1).T                                                            # (B, 2)
        rows, token_hidden, targets = response_tokens(hidden, labels)
        res = fused_policy_loss(token_hidden, heads, targets, rows, ref, log_w, loss.beta, **loss.loss_kwargs)
        res = res._replace(ref_logps=ref if loss.ref_logps is None else None)
    else:
        raise ValueError("MixturePolicy.forward(loss=...): for dense (K, V, H) or low-rank heads only, not "
                         "expert-parallel or the tied K = 1 head")
    logps = res.policy_logps.transpose(0, 1).reshape(-1, res.policy_logps.shape[2]).float()    # (2B, K)
    ref_logps = None if res.ref_logps is None else res.ref_logps.T.reshape(-1).float()         # (2B,)
    return logps, ref_logps, res.policy_loss, res.resp
