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

import torch
import torch.nn as nn

from mixdpo_ds.model.hf_lm import response_tokens, sum_per_row


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
                impl: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
        """(2B, T, H), (V, H), (2B, T) -> (2B, K) fp32 sums over response tokens, or (2B, K + 1) with the base
        head's own log-probs in column K (include_base). impl "auto" runs the chunked PyTorch path (the Triton
        kernel has no low-rank variant yet). A module forward, not a plain method: ZeRO-3 gathers up / down (and
        the external base head, `register_heads_for_zero3`) around it."""
        from mixdpo_ds.kernels import lowrank_logprobs  # lazy: keeps `import experts` light

        rows, token_hidden, targets = response_tokens(hidden, labels)
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
