"""Fused kernels of mixdpo-ds (installed as `mixdpo_ds.kernels`; docs/ARCHITECTURE.md "Kernels").

    expert_logprobs(hidden (N, H), heads (K, V, H), targets (N,), impl=..., chunk_size=None) -> (N, K) fp32
    lowrank_logprobs(hidden (N, H), base (V, H), up (K, V, r), down (K, r, H), targets (N,), bias=None,
                     include_base=False, impl=...) -> (N, K) or (N, K + 1) fp32      (low-rank expert heads)
    mbt_loss(policy_logps (B, 2, K), ref_logps, log_w, beta, ..., impl=...) -> MixDPOOutput
    fused_policy_loss(hidden, heads, targets, rows, ref_logps, log_w, beta, ...) -> FusedPolicyLoss
                     K-head log-probs + Mix-DPO policy loss + gradients in one pass per chunk of pairs (no recompute)
    fused_lowrank_policy_loss(hidden, base, up, down, targets, rows, ref_logps, log_w, beta, bias=None, ...)
                     the same for K low-rank heads; ref_logps=None: the base head's reference from the same pass

impl: "naive" (materialise, plain autograd; the reference), "chunked" (PyTorch, bounded memory; the CPU
default), "triton" (GPU kernels; on CPU only under TRITON_INTERPRET=1). `default_impl(device)` picks one.

The Triton modules are imported on first use, not here: `@triton.jit` decides between compiler and
interpreter when the decorator runs, so TRITON_INTERPRET must be set before they are imported.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from .chunked import expert_logprobs_chunked
from .fused_policy_loss import FusedPolicyLoss, fused_policy_loss
from .lowrank import lowrank_logprobs_chunked
from .lowrank_fused import fused_lowrank_policy_loss
from .naive import IGNORE_INDEX, expert_logprobs_naive, lowrank_logprobs_naive, mbt_loss_naive

IMPLS = ("naive", "chunked", "triton")

__all__ = ["IGNORE_INDEX", "IMPLS", "FusedPolicyLoss", "default_impl", "expert_logprobs", "fused_lowrank_policy_loss",
           "fused_policy_loss", "lowrank_logprobs", "mbt_loss", "triton_module", "triton_self_check"]


def default_impl(device: torch.device | str, fallback: str = "chunked") -> str:
    """"triton" on CUDA devices whose one-time self-check passes (`triton_self_check`), `fallback` elsewhere."""
    return "triton" if torch.device(device).type == "cuda" and triton_self_check(device) else fallback


_SELF_CHECKED: dict[str, bool] = {}


def triton_self_check(device: torch.device | str) -> bool:
    """Once per device: both Triton kernels against the PyTorch paths on a small random problem, values and every
    gradient. False, with a warning naming the failure, if they fail to compile, raise or disagree; `auto` then
    falls back to the PyTorch paths (the GPU path has had no CI: this is its guard on first use)."""
    key = str(torch.device(device))
    if key not in _SELF_CHECKED:
        try:
            reason = _compare_with_pytorch(torch.device(device))
        except Exception as e:  # compile errors, missing driver, launch failures
            reason = f"{type(e).__name__}: {e}"
        _SELF_CHECKED[key] = reason is None
        if reason is not None:
            warnings.warn(f"mixdpo_ds.kernels: the Triton kernels failed their self-check on {key} ({reason}); "
                          "using the PyTorch paths (chunked / naive) instead", RuntimeWarning, stacklevel=2)
    return _SELF_CHECKED[key]


def _compare_with_pytorch(device: torch.device) -> str | None:
    """None when Triton matches PyTorch (fp32, rtol 1e-4) on outputs and gradients, else what differed."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 64, generator=g).to(device).requires_grad_()
    heads = (0.1 * torch.randn(3, 300, 64, generator=g)).to(device).requires_grad_()
    targets = torch.randint(0, 300, (37,), generator=g)
    targets[::5] = IGNORE_INDEX
    targets = targets.to(device)
    weights = torch.randn(37, 3, generator=g).to(device)
    outs = {}
    for impl in ("chunked", "triton"):
        lp = expert_logprobs(hidden, heads, targets, impl=impl)
        outs[impl] = (lp, *torch.autograd.grad((lp * weights).sum(), (hidden, heads)))
    policy = (torch.randn(8, 2, 3, generator=g) - 20).to(device).requires_grad_()
    ref = (torch.randn(8, 2, generator=g) - 20).to(device)
    log_w = torch.log_softmax(torch.randn(8, 3, generator=g), -1).to(device).requires_grad_()
    for impl in ("naive", "triton"):
        res = mbt_loss(policy, ref, log_w, 0.5, lambda_global=0.1, impl=impl)
        outs[f"mbt_{impl}"] = (res.loss, res.resp, *torch.autograd.grad(res.loss, (policy, log_w)))
    for (a, b), names in ((("chunked", "triton"), ("logps", "d_hidden", "d_heads")),
                          (("mbt_naive", "mbt_triton"), ("loss", "resp", "d_policy_logps", "d_log_w"))):
        for name, x, y in zip(names, outs[a], outs[b], strict=True):
            if not torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5):
                return f"{name}: max |triton - pytorch| = {(x.float() - y.float()).abs().max().item():.3g}"
    return None


def triton_module(name: str):
    """Import `mixdpo_ds.kernels.<name>` (a Triton kernel file) on first use.

    The import binds the submodule over this package's public function of the same name
    (`expert_logprobs`, `mbt_loss`); put the function back so `from mixdpo_ds.kernels import X` stays X.
    """
    public = globals().get(name)
    module = importlib.import_module(f"{__name__}.{name}")
    if public is not None:
        globals()[name] = public
    return module


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    return impl


def _check_expert_inputs(hidden: torch.Tensor, heads: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or heads.dim() != 3 or heads.shape[2] != hidden.shape[1]:
        raise ValueError(f"expected hidden (N, H) and heads (K, V, H), got {tuple(hidden.shape)} and "
                         f"{tuple(heads.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
        raise ValueError(f"targets must be a long tensor of shape (N,) = ({hidden.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if not (hidden.is_floating_point() and heads.is_floating_point()):
        raise ValueError(f"hidden and heads must be floating point, got {hidden.dtype} and {heads.dtype}")


def expert_logprobs(
    hidden: torch.Tensor, heads: torch.Tensor, targets: torch.Tensor, impl: str = "chunked",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token log-probs of K expert LM heads without (by default) materialising (N, K, V) logits.

    logp[n, k] = log_softmax_v(heads[k] @ hidden[n])[targets[n]];  0 (and no gradient) where targets == -100.

    Args:
        hidden: (N, H) trunk hidden states of the response tokens; fp32 / bf16 / fp16.
        heads: (K, V, H) stacked expert LM-head weights (bias-free, as HF LM heads).
        targets: (N,) long next-token ids in [0, V), or -100 (ignored).
        impl: "naive" | "chunked" | "triton" (see `default_impl`).
        chunk_size: tokens per logits tile ("chunked" only; see `kernels/chunked.py` for the memory bound).
    Returns:
        (N, K) fp32 log-probs (all math in fp32); gradients reach hidden and heads in their own dtypes.
        fp64 inputs (test references): naive and chunked compute and return fp64, triton refuses them.
    """
    _check_expert_inputs(hidden, heads, targets)
    if _check_impl(impl) == "naive":
        return expert_logprobs_naive(hidden, heads, targets, chunk_size)
    if impl == "chunked":
        return expert_logprobs_chunked(hidden, heads, targets, chunk_size)
    return triton_module("expert_logprobs").expert_logprobs_triton(hidden, heads, targets, chunk_size)


def _check_lowrank_inputs(hidden, base, up, down, targets, bias) -> None:
    N, H = hidden.shape if hidden.dim() == 2 else (None, None)
    V = base.shape[0] if base.dim() == 2 else None
    K, r = (up.shape[0], up.shape[2]) if up.dim() == 3 else (None, None)
    if (None in (N, V, K) or base.shape[1] != H or up.shape[1] != V or down.shape != (K, r, H)
            or (bias is not None and bias.shape != (K, V))):
        raise ValueError(f"expected hidden (N, H), base (V, H), up (K, V, r), down (K, r, H), bias (K, V) or None; "
                         f"got {tuple(hidden.shape)}, {tuple(base.shape)}, {tuple(up.shape)}, {tuple(down.shape)}, "
                         f"{None if bias is None else tuple(bias.shape)}")
    if targets.shape != (N,) or targets.dtype != torch.long:
        raise ValueError(f"targets must be a long tensor of shape (N,) = ({N},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")


LOWRANK_IMPLS = ("naive", "chunked")


def lowrank_logprobs(
    hidden: torch.Tensor, base: torch.Tensor, up: torch.Tensor, down: torch.Tensor, targets: torch.Tensor,
    bias: torch.Tensor | None = None, include_base: bool = False, impl: str = "chunked", chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token log-probs of K low-rank expert heads sharing one base head (docs/math.md §16).

    logp[n, k] = log_softmax_v(base @ h_n + up[k] @ (down[k] @ h_n) + bias[k])[t_n];  0 where t_n == -100.

    Args:
        hidden: (N, H) trunk hidden states of the response tokens.
        base: (V, H) the shared head W (frozen or trained); up: (K, V, r) A_k; down: (K, r, H) B_k.
        targets: (N,) long next-token ids or -100; bias: (K, V) per-expert logit bias or None.
        include_base: append column K, the base head's own log-probs (the reference of a frozen trunk).
        impl: "naive" | "chunked" (the shared tile is computed once per vocabulary block); there is no Triton
            kernel for low-rank heads.
        chunk_size: tokens per logits tile (chunked).
    Returns:
        (N, K) or (N, K + 1) fp32 (fp64 for fp64 inputs); gradients reach every floating input in its dtype.
    """
    _check_lowrank_inputs(hidden, base, up, down, targets, bias)
    # No Triton kernel for low-rank heads (experts.head_rank refuses logprob_impl=triton at config time): the
    # chunked path already computes the shared tile once per vocabulary block.
    if impl not in LOWRANK_IMPLS:
        raise ValueError(f"lowrank_logprobs: impl={impl!r}: allowed {LOWRANK_IMPLS}")
    fn = lowrank_logprobs_naive if impl == "naive" else lowrank_logprobs_chunked
    return fn(hidden, base, up, down, targets, bias, include_base, chunk_size)


def mbt_loss(*args, impl: str = "naive", **kwargs):
    """`mixdpo_ds.core.losses.mixdpo_loss` (same arguments, same `MixDPOOutput`), with impl="triton" for the fused
    forward+backward of `kernels/mbt_loss.py`. "chunked" and "naive" are the PyTorch version (it is O(B·K))."""
    if _check_impl(impl) == "triton":
        policy_logps = args[0] if args else kwargs.get("policy_logps")
        if policy_logps is not None and policy_logps.dim() == 3 and policy_logps.shape[1] != 2:
            raise ValueError(f"loss.impl=triton fuses pairs only (policy_logps (B, 2, K)); these items rank "
                             f"m = {policy_logps.shape[1]} responses: use loss.impl=naive (or auto, which takes the "
                             "PyTorch path for rankings; docs/math.md §15)")
        return triton_module("mbt_loss").mbt_loss_triton(*args, **kwargs)
    return mbt_loss_naive(*args, **kwargs)
