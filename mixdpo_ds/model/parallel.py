"""Expert parallelism for `heads` experts on DeepSpeed's MoE process groups.

The K expert LM heads (K, V, H) are the big tensor of a `heads` run (K·V·H vs the trunk). With
`experts.ep_size = P` each rank of an expert-parallel group holds K/P of them. Per step (DEEPSPEED-NOTES):

    hidden (N_r, H) of rank r's response tokens
      --all-gather within the EP group-->   (Σ_r N_r, H)        backward: sum of grads, own slice
      --K/P local heads, every sequence-->  (P·S, K/P) seq log-probs (index_add_ of token log-probs)
      --all-to-all (`compat.all_to_all`)--> (S, K) rank r's sequences under all K experts

Communication per step: the response hidden states and the (S, K) table, instead of ZeRO-3's
all-gather of all K·V·H head weights twice per step.

Why a `deepspeed.moe.layer.MoE` subclass without its token gate: DeepSpeed's engine detects expert
parallelism by `isinstance(module, MoE)` (without it ZeRO-2 crashes in `average_tensor` on a None
expert group), creates the expert / expert-data-parallel groups, reduces the heads' gradients only
within the expert-data-parallel group (divided by the full data-parallel size, so the update is
the one of the global-batch mean loss), and writes one checkpoint file per expert
(`layer_0_expert_{k}_mp_rank_00_model_states.pt`). Its token router cannot give log π_k(y|x) of
every expert for every sequence, which the E-step needs, so `MoE.__init__` is skipped.

Limits: ZeRO-3 refuses native MoE layers, so expert parallelism needs ZeRO ≤ 2 (`check_expert_parallel`
says so); ZeRO-3 runs use dense heads.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as torch_dist
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from mixdpo_ds.compat import all_to_all, expert_parallel_group, local_numel
from mixdpo_ds.model.hf_lm import IGNORE_INDEX


def check_expert_parallel(num_experts: int, ep_size: int, zero_stage: int = 0, world_size: int | None = None) -> None:
    """Raise ValueError naming the key when `experts.ep_size` cannot be used with this run (world_size
    None = not checked)."""
    if ep_size < 1:
        raise ValueError(f"experts.ep_size must be >= 1, got {ep_size}")
    if num_experts % ep_size != 0:
        allowed = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"experts.ep_size={ep_size} must divide experts.num_experts={num_experts}; allowed ep_size: {allowed}"
        )
    if ep_size > 1 and zero_stage >= 3:
        raise ValueError(
            f"experts.ep_size={ep_size} needs ZeRO stage 0, 1 or 2, got deepspeed zero_stage={zero_stage}: "
            "DeepSpeed refuses native MoE layers under ZeRO-3; use experts.ep_size=1 (dense heads) with ZeRO-3"
        )
    if world_size is not None and world_size % ep_size != 0:
        raise ValueError(f"experts.ep_size={ep_size} must divide the world size {world_size}")


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel group of size `ep_size` (see `MoE.__init__`)."""
    return f"ep_size_{ep_size}"


def ensure_expert_groups(ep_size: int) -> torch_dist.ProcessGroup:
    """Create DeepSpeed's expert and expert-data-parallel groups once; return this rank's EP group.

    Layout (DeepSpeed's default, E + D): world 4, ep 2 -> EP groups [0, 1], [2, 3] (experts split
    here, all-to-all), expert-data-parallel groups [0, 2], [1, 3] (the heads' gradients all-reduced).
    """
    return expert_parallel_group(expert_group_name(ep_size), ep_size)


def _local_logprobs(hidden: torch.Tensor, heads: torch.Tensor, targets: torch.Tensor, impl: str,
                    chunk_size: int | None) -> torch.Tensor:
    """(N, H), (K, V, H), (N,) -> (N, K) fp32 token log-probs via `mixdpo_ds.kernels.expert_logprobs`."""
    from mixdpo_ds.kernels import expert_logprobs

    kwargs = {} if impl == "auto" else {"impl": impl}
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    return expert_logprobs(hidden, heads, targets, **kwargs)


class _GatherRows(torch.autograd.Function):
    """All-gather rows of different counts within `group`; backward sums the grads, keeps own rows.

    forward: x (n_r, H) on rank r -> (Σ_j n_j, H), rank order. backward: grad (Σ_j n_j, H) differs per
    rank (each rank's loss uses the gathered rows); the true grad of rank r's rows is the sum over the
    group, i.e. a reduce-scatter; gloo has no reduce_scatter, so all_reduce + slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
        rank, n_max = torch_dist.get_rank(group), max(counts)
        padded = x.new_zeros((n_max, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        torch_dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.counts, ctx.group, ctx.rank = counts, group, rank
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=False)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None


def _gather_no_grad(x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """All-gather rows of different counts (no autograd): (n_r, ...) -> (Σ_j n_j, ...)."""
    with torch.no_grad():
        return _GatherRows.apply(x, counts, group)


class _HeadsLayer(nn.Module):
    """Stands where `MoE.deepspeed_moe` (an `MOELayer`) stands, so DeepSpeed's per-expert checkpoint
    keys (`deepspeed_moe.experts.deepspeed_experts.{k}.weight`) and `_set_ep_group` work unchanged."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        self.experts = experts
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group


class _Head(nn.Module):
    """One expert LM head: weight (V, H), no bias (heads with bias are not supported)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, hidden_size))


class ExpertParallelHeads(MoE):
    """K expert LM heads split over the ranks of an expert-parallel group of size `ep_size`.

    Args:
        num_experts: K. Must be divisible by `ep_size`.
        vocab_size, hidden_size: V, H of each head (V, H).
        ep_size: P, ranks per expert-parallel group; rank r of the group holds experts
            [r·K/P, (r+1)·K/P).
        logprob_impl, chunk_size: passed to `mixdpo_ds.kernels.expert_logprobs`.
    The local heads start at zero: fill them with `from_dense` or `load_dense_heads`.
    """

    def __init__(self, num_experts: int, vocab_size: int, hidden_size: int, ep_size: int = 1,
                 logprob_impl: str = "auto", chunk_size: int | None = None) -> None:
        nn.Module.__init__(self)  # skip MoE.__init__: its TopKGate routes tokens, we score sequences
        check_expert_parallel(num_experts, ep_size)
        self.ep_size = ep_size
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.logprob_impl, self.chunk_size = logprob_impl, chunk_size
        experts = Experts(_Head(vocab_size, hidden_size), self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = _HeadsLayer(experts)

    # -- process groups -------------------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by `deepspeed.initialize`; the groups may already exist (`from_dense`)."""
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel_ is not supported by ExpertParallelHeads")
        self.deepspeed_moe._set_ep_group(ensure_expert_groups(self.ep_size))

    @property
    def ep_group(self):
        if self.deepspeed_moe.ep_group is None:
            self.set_deepspeed_parallelism()
        return self.deepspeed_moe.ep_group

    @property
    def ep_rank(self) -> int:
        return torch_dist.get_rank(self.ep_group) if self.ep_size > 1 else 0

    def local_expert_ids(self) -> list[int]:
        """Global expert ids held here: [ep_rank·K/P, (ep_rank+1)·K/P)."""
        start = self.ep_rank * self.num_local_experts
        return list(range(start, start + self.num_local_experts))

    def local_heads(self) -> torch.Tensor:
        """(K/P, V, H) stacked local heads (a copy; gradients flow to each head's weight)."""
        return torch.stack([e.weight for e in self.deepspeed_moe.experts.deepspeed_experts])

    # -- build / export -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, heads: torch.Tensor, ep_size: int, **kwargs) -> ExpertParallelHeads:
        """Keep this rank's K/P slice of dense heads (K, V, H) (identical on every rank)."""
        num_experts, vocab_size, hidden_size = heads.shape
        module = cls(num_experts, vocab_size, hidden_size, ep_size, **kwargs)
        module.load_dense_heads(heads)
        return module

    @torch.no_grad()
    def load_dense_heads(self, heads: torch.Tensor) -> None:
        """Copy this rank's slice of dense heads (K, V, H) into the local heads."""
        if tuple(heads.shape) != (self.num_experts, self.vocab_size, self.hidden_size):
            raise ValueError(f"heads must be {(self.num_experts, self.vocab_size, self.hidden_size)}, "
                             f"got {tuple(heads.shape)}")
        for expert, k in zip(self.deepspeed_moe.experts.deepspeed_experts, self.local_expert_ids(), strict=False):
            expert.weight.copy_(heads[k])

    @torch.no_grad()
    def gather_dense_state(self) -> torch.Tensor:
        """(K, V, H) all heads, on every rank of the EP group (collective: all ranks must call it)."""
        local = self.local_heads().detach().contiguous()  # (K/P, V, H)
        if self.ep_size == 1:
            return local.clone()
        parts = [torch.empty_like(local) for _ in range(self.ep_size)]
        torch_dist.all_gather(parts, local, group=self.ep_group)
        return torch.cat(parts, dim=0)  # (K, V, H), expert order = rank order

    # -- forward --------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, seq_index: torch.Tensor,
                num_seqs: int) -> torch.Tensor:
        """Sequence log-probs of all K experts for this rank's sequences.

        Args:
            hidden: (N, H) trunk hidden states of this rank's response tokens (the state that predicts
                `targets`).
            targets: (N,) next-token ids (-100 = ignored).
            seq_index: (N,) long, the sequence (row of the output) of each token, in [0, num_seqs).
            num_seqs: S, this rank's sequence count (2B_local); may differ across ranks.
        Returns:
            (S, K) fp32: logps[s, k] = Σ_{n: seq_index[n] = s} log π_k(targets[n] | ·), exact gradients
            into `hidden` and into the local heads (DeepSpeed averages them over the data-parallel ranks).
        """
        heads = self.local_heads()  # (K/P, V, H)
        if self.ep_size == 1:
            token_logps = _local_logprobs(hidden, heads, targets, self.logprob_impl, self.chunk_size)  # (N, K)
            out = token_logps.new_zeros(num_seqs, self.num_experts)
            return out.index_add(0, seq_index, token_logps)
        group, P = self.ep_group, self.ep_size
        sizes = torch.tensor([hidden.shape[0], num_seqs], dtype=torch.long, device=hidden.device)  # NCCL: on device
        all_sizes = [torch.empty_like(sizes) for _ in range(P)]
        torch_dist.all_gather(all_sizes, sizes, group=group)
        counts = [int(s[0]) for s in all_sizes]  # tokens per rank
        s_max = max(int(s[1]) for s in all_sizes)  # sequences per rank, padded to the largest
        hidden_all = _GatherRows.apply(hidden, counts, group)  # (Σ N_j, H)
        targets_all = _gather_no_grad(targets, counts, group)  # (Σ N_j,)
        offsets = torch.repeat_interleave(torch.arange(P, device=hidden.device) * s_max,
                                          torch.tensor(counts, device=hidden.device))
        seq_all = _gather_no_grad(seq_index, counts, group) + offsets  # (Σ N_j,) row in (P·S_max)
        token_logps = _local_logprobs(hidden_all, heads, targets_all, self.logprob_impl, self.chunk_size)
        table = token_logps.new_zeros(P * s_max, self.num_local_experts).index_add(0, seq_all, token_logps)
        # (P, S_max, K/P): block j holds rank j's sequences; after all-to-all block j holds rank j's experts
        received = all_to_all(group, table.view(P, s_max, self.num_local_experts))
        return received.permute(1, 0, 2).reshape(s_max, self.num_experts)[:num_seqs]  # (S, K)


def head_param_bytes(module: nn.Module) -> int:
    """Bytes of expert-head parameters this rank holds: the local heads of an ExpertParallelHeads, else every
    parameter whose name contains 'head' (a MixturePolicy's `heads` / `ep_heads.*`); a ZeRO-3 parameter
    counts its local partition."""
    if isinstance(module, ExpertParallelHeads):
        params = list(module.deepspeed_moe.experts.parameters())
    else:
        params = [p for n, p in module.named_parameters() if "head" in n]
    return sum(local_numel(p) * p.element_size() for p in params)


def moe_param_groups(param_groups: list[dict]) -> list[dict]:
    """Split optimizer param groups so the expert heads get their own 'moe' groups (DeepSpeed needs
    them to reduce expert gradients within the expert-data-parallel group). Groups without a 'name'
    get one ('group_{i}'); per-group lr and weight decay are kept; groups left empty are dropped (a
    frozen trunk leaves only the heads)."""
    named = [{"name": g.get("name", f"group_{i}"), **g} for i, g in enumerate(param_groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]


def ep_sequence_logps(ep_heads: ExpertParallelHeads, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`experts.sequence_logps` for expert-parallel heads: (2B, T, H), (2B, T) -> (2B, K) fp32.

    Same token selection: position t predicts labels[t + 1]; only response tokens (label != -100) go in.
    """
    targets = labels[:, 1:]  # (2B, T-1)
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # (N,), (N,)
    return ep_heads(hidden[:, :-1][rows, cols], targets[rows, cols], rows, hidden.shape[0])  # (2B, K)


def build_expert_parallel_heads(heads: torch.Tensor, cfg) -> ExpertParallelHeads:
    """ExpertParallelHeads holding this rank's slice of dense heads (K, V, H); cfg: an ExpertsConfig.
    Refuses ZeRO-3 (seen through a live `HfDeepSpeedConfig`, which the trainer keeps for stage 3)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    world = torch_dist.get_world_size() if torch_dist.is_initialized() else None
    check_expert_parallel(cfg.num_experts, cfg.ep_size, 3 if is_deepspeed_zero3_enabled() else 0, world)
    return ExpertParallelHeads.from_dense(heads, cfg.ep_size, logprob_impl=cfg.logprob_impl,
                                          chunk_size=cfg.chunk_size)


def dense_policy(policy):
    """A MixturePolicy with dense (K, V, H) heads gathered from an expert-parallel one, for export
    (`policy.expert_model(k)`). Collective: every rank of the EP group must call it. Shares the trunk."""
    if getattr(policy, "ep_heads", None) is None:
        return policy
    heads = policy.ep_heads.gather_dense_state()  # (K, V, H)
    cfg = dataclasses.replace(policy.cfg, ep_size=1)
    return type(policy)(cfg, policy.config, trunk=policy.trunk, heads=heads, ref_head=policy.ref_head)
