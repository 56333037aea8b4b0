"""Rank / world helpers, global-batch reductions and batch sharding.

Convention (how a P-rank run reproduces a 1-rank run on the same global batch): every rank draws the
*same* global batch of G = micro_batch_size × P pairs (same seed, same order), keeps its contiguous
slice `shard(batch, rank, P)` of G/P pairs, and computes its loss as the mean over its slice; DeepSpeed
averages gradients over ranks, so the update is the gradient of the global-batch mean loss. Quantities
that are not a mean of per-pair terms (the Mix-DPO weight update, logged metrics) go through the
reductions here.

Works without a launcher (world size 1: MASTER_ADDR/PORT, RANK, WORLD_SIZE get defaults) and under
`deepspeed --num_accelerators N` (the launcher sets RANK, LOCAL_RANK, WORLD_SIZE and passes
`--local_rank`); gloo on the CPU, the accelerator's backend otherwise.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

from mixdpo_ds.compat import deepspeed_shm_comm_disabled, hf_deepspeed_config_suspended

log = logging.getLogger("mixdpo_ds")
SHM_OP = "deepspeed_shm_comm"   # DeepSpeed's CPU all-reduce op, JIT-built by torch's cpp_extension once per machine
STALE_LOCK_S = 600.0            # a live build holds its lock for about a minute


def shm_buffer_path() -> str:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for this rank (docs/deepspeed.md §13):
    deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{RANK}."""
    env = os.environ
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{env.get('RANK', '0')}")


def _remove_shm_buffer(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # other ranks' existing mappings stay valid; the name is what leaks


def remove_stale_build_lock(name: str = SHM_OP, older_than_s: float = STALE_LOCK_S) -> bool:
    """A process killed while torch JIT-builds an extension leaves `lock` in the extension's build directory, and
    every later build of it then waits on that file forever, without a message (torch's FileBaton). Remove such a
    lock when it is older than `older_than_s` and the built library is already there, with a warning; True when one
    was removed. Only the node's first rank calls it (two ranks must not race on one lock)."""
    from torch.utils.cpp_extension import _get_build_directory

    build = _get_build_directory(name, verbose=False)
    lock, built = os.path.join(build, "lock"), os.path.join(build, f"{name}.so")
    try:
        age = time.time() - os.stat(lock).st_mtime
    except FileNotFoundError:
        return False
    if age < older_than_s or not os.path.exists(built):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock)
    log.warning("removed a stale build lock %s (%.0f s old, %s already built): a process was killed while "
                "compiling DeepSpeed's CPU all-reduce op, and every multi-rank run would have waited on it", lock,
                age, built)
    return True


def on_cpu() -> bool:
    """True when DeepSpeed's accelerator is the CPU (the run's tensors live in host memory)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() == "cpu"


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> None:
    """Initialise torch.distributed through DeepSpeed once (no-op when already initialised).

    `timeout_s` bounds every collective: a rank that stops answering (a frozen or killed peer) makes the others
    fail with a timeout error after that many seconds instead of waiting forever. The process removes its own
    DeepSpeed shm all-reduce buffer at exit (DeepSpeed never does; a SIGKILLed process still leaves its file).
    One process (WORLD_SIZE 1), or ranks spread over several nodes (LOCAL_SIZE < WORLD_SIZE), do not build that shm
    op at all (`deepspeed_shm_comm_disabled`).

    Under srun without the launcher (the alternative in launch/slurm.sbatch's header) SLURM_PROCID / SLURM_NTASKS /
    SLURM_LOCALID give RANK / WORLD_SIZE / LOCAL_RANK (MASTER_ADDR / MASTER_PORT come from the sbatch script).
    Defaults for a plain `python ...` run: RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR=127.0.0.1, MASTER_PORT a
    free port (parallel single-process runs, e.g. tests, must not collide on 29500).
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun without a launcher (launch/slurm.sbatch)
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ["WORLD_SIZE"] = "1"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    if backend is None:
        backend = "gloo" if on_cpu() else get_accelerator().communication_backend_name()
    # One process never all-reduces through shared memory: skip DeepSpeed's JIT build of that op (docs/deepspeed.md
    # §13). Several ranks build it once per machine (torch's extension cache, one rank compiles under a file lock).
    # Ranks on several nodes never use it either (DeepSpeed's CPU backend takes it only when LOCAL_SIZE == WORLD_SIZE).
    local = os.environ.get("LOCAL_SIZE", os.environ["WORLD_SIZE"])
    unused = os.environ["WORLD_SIZE"] == "1" or local != os.environ["WORLD_SIZE"]
    if not unused and backend == "gloo" and os.environ.get("LOCAL_RANK", "0") == "0":
        remove_stale_build_lock()  # else every rank would sleep on it (README "Known limitations")
    with deepspeed_shm_comm_disabled() if unused else contextlib.nullcontext():
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=timeout_s))
    atexit.register(_remove_shm_buffer, shm_buffer_path())


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return torch_dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of data-parallel ranks (1 without a process group)."""
    return torch_dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        torch_dist.barrier()


def all_reduce_min(t: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise minimum of `t` over ranks (a new tensor). Identity on one rank."""
    out = t.detach().clone()
    if is_initialized() and torch_dist.get_world_size(group) > 1:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MIN, group=group)
    return out


def all_ranks_true(flag: bool, device="cpu") -> bool:
    """True when `flag` holds on every rank (every rank must call it)."""
    return bool(all_reduce_min(torch.tensor([1.0 if flag else 0.0], device=device)).item() > 0)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor; no autograd). Identity on one rank."""
    out = t.detach().clone()
    if is_initialized() and torch_dist.get_world_size(group) > 1:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_mean(t: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of `t` over ranks (a new tensor; no autograd). With equal shard sizes the mean of the
    per-rank batch means is the global-batch mean (e.g. the logged loss)."""
    size = torch_dist.get_world_size(group) if is_initialized() else 1
    return all_reduce_sum(t, group) / size


def global_mean_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Mean over the rows of the global batch: x (B_r, ...) on each rank -> (...) = Σ_r Σ_i x_ri / Σ_r B_r.

    Exact also for unequal shards (sum and count are reduced separately). Used for the Mix-DPO closed
    form w ← normalise((1−ρ) w + ρ · mean_i q_i) (docs/math.md §5, D.4) with q = resp (B_r, K): pass
    `global_mean_rows(resp)` where a 1-rank run would use `resp.mean(0)`.
    """
    x = x.detach()
    sums = torch.cat([x.sum(0).reshape(-1).double(), x.new_tensor([x.shape[0]], dtype=torch.float64)])
    sums = all_reduce_sum(sums, group)
    return (sums[:-1] / sums[-1]).to(x.dtype).reshape(x.shape[1:])


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_r x_r on every rank; backward: grad_x_r = Σ_r grad_y_r (each rank's loss depends on y)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        torch_dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, group=ctx.group)
        return grad, None


def differentiable_global_mean_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Like `global_mean_rows` but differentiable, for batch-level terms inside the loss such as
    λ_global · KL(w̄ ‖ U) with w̄ = mean_i w_i (docs/math.md §7, E.1).

    Each rank adds the same term to its local loss; DeepSpeed divides the summed gradients by P, and the
    backward here sums the P identical upstream grads, so the update equals the 1-rank global-batch one.
    """
    if not is_initialized() or torch_dist.get_world_size(group) == 1:
        return x.mean(0)
    count = all_reduce_sum(x.new_tensor([float(x.shape[0])]), group)
    return _AllReduceSum.apply(x.sum(0), group) / count


def shard(global_batch_examples: list[Any], rank: int, world: int) -> list[Any]:
    """Contiguous slice `rank` of `world` equal slices of one global batch.

    Example: 6 examples, world 2 -> rank 0 gets [0, 1, 2], rank 1 gets [3, 4, 5]. The global batch size
    must divide by `world` (equal slices keep 'mean of rank means = global mean' exact).
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard needs 0 <= rank < world, got rank={rank}, world={world}")
    n = len(global_batch_examples)
    if n % world != 0:
        raise ValueError(f"global batch of {n} examples does not split into {world} equal rank shards; "
                         f"choose train.micro_batch_size so that the global batch is a multiple of {world}")
    size = n // world
    return global_batch_examples[rank * size : (rank + 1) * size]


@contextlib.contextmanager
def replicated_load():
    """Inside the block, `from_pretrained` builds an ordinary (replicated, unpartitioned) model even while an
    `HfDeepSpeedConfig` for ZeRO-3 is alive.

    Why: a frozen reference built under ZeRO-3's `zero.Init` is partitioned but never wrapped in an engine, so
    its forward sees empty weights ("'weight' must be 2-D"). Replicating the (frozen, no-optimizer) reference
    costs one model per rank; a second engine without optimizer would shard it (DEEPSPEED-NOTES).
    """
    with hf_deepspeed_config_suspended():
        yield
