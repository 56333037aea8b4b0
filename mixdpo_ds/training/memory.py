"""What a rank holds, measured: the bytes of its parameter shards, gradients and optimizer states, and the process's
resident memory (docs/scaling.md "Measured").
Gradients: the `.grad` of the model's parameters and of the master partitions (DeepSpeed's own reduce buckets are
not tensors we can see; docs/scaling.md counts them). Master weights: the torch optimizer's parameters that are not
the model's, and ZeRO's fp32 flat partitions where they are copies (ZeRO-3 swaps them into the optimizer only inside
its step; DeepSpeed 0.19.8 copies them even in fp32, docs/scaling.md).

`MemoryReport` is taken at the end of set-up and again at the end of training (and after the export); each rank
writes `run_dir/memory/rank{r}.json`. Tensor bytes are counted from the tensors themselves, so they are exact:
under ZeRO-3 a parameter's bytes are its partition (`ds_tensor`), not the full tensor; optimizer states are the
tensors in the innermost torch optimizer's `state`, and master weights are its parameters that are not the model's
own (ZeRO keeps fp32 flat partitions). Resident memory is the kernel's VmRSS / VmHWM (Linux), in MiB.
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import torch


def _status_mib(field: str) -> float | None:
    """VmRSS / VmHWM of this process in MiB (None where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float | None:
    return _status_mib("VmHWM")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _wrappers(optimizer):
    """The optimizer and what it wraps: DeepSpeed's ZeRO optimizers keep the torch optimizer as `.optimizer`."""
    for _ in range(5):
        if optimizer is None:
            return
        yield optimizer
        optimizer = getattr(optimizer, "optimizer", None)


def _inner_optimizer(optimizer):
    """The torch.optim.Optimizer under DeepSpeed's wrappers."""
    return next((o for o in _wrappers(optimizer) if isinstance(o, torch.optim.Optimizer)), None)


# the fp32 partitions a ZeRO optimizer steps: stage 3 (`fp32_partitioned_groups_flat`, swapped into the torch
# optimizer's param_groups only inside step()) and stage 1/2 (`single_partition_of_fp32_groups`)
ZERO_FLAT_MASTERS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")


def _zero_flat_masters(optimizer) -> list[torch.Tensor]:
    return [t for o in _wrappers(optimizer) for name in ZERO_FLAT_MASTERS for t in getattr(o, name, None) or []
            if torch.is_tensor(t)]


def tensor_bytes(module: torch.nn.Module, optimizer=None) -> dict[str, int]:
    """This rank's bytes of parameters (ZeRO-3: its partitions), trainable parameters, gradients, optimizer states
    and master weights."""
    params = trainable = grads = 0
    model_storages = set()  # a tensor that shares one of these is the model's own, not a master copy
    for p in module.parameters():
        shard = getattr(p, "ds_tensor", None)
        held = shard if shard is not None else p
        params += _nbytes(held)
        trainable += _nbytes(held) if p.requires_grad else 0
        if p.grad is not None:
            grads += _nbytes(p.grad)
        model_storages.add(held.untyped_storage().data_ptr())
    states = master = 0
    inner = _inner_optimizer(optimizer)
    if inner is not None:
        for state in inner.state.values():
            states += sum(_nbytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        seen = set(model_storages)
        # ZeRO keeps its fp32 flat partitions out of param_groups between steps: count them either way, once
        for p in [p for group in inner.param_groups for p in group["params"]] + _zero_flat_masters(optimizer):
            ptr = p.untyped_storage().data_ptr()
            if p.numel() and ptr not in seen:
                seen.add(ptr)
                master += _nbytes(p)
                grads += _nbytes(p.grad) if p.grad is not None else 0  # ZeRO: the partition's fp32 gradient
    return {"param_bytes": params, "trainable_param_bytes": trainable, "grad_bytes": grads,
            "optimizer_state_bytes": states, "master_weight_bytes": master}


def _glibc():
    """glibc through ctypes, or None (another libc, macOS, Windows: the allocator calls below do nothing)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_free_heap() -> bool:
    """Hand freed heap memory back to the OS (glibc `malloc_trim(0)`): loading a model under ZeRO-3 reads whole
    tensors and keeps only each rank's partition, and glibc keeps the freed pages resident; False where there is
    no glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc else False


M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def mmap_large_allocations(threshold_bytes: int) -> bool:
    """Serve every allocation of at least `threshold_bytes` with its own mmap (glibc `mallopt(M_MMAP_THRESHOLD)`),
    so freeing a tensor returns its pages to the OS at once; False where there is no glibc.

    glibc's default starts at 128 KiB but raises the threshold to the size of each mmapped block it frees, up to
    32 MiB: after the first few frees, a training step's gradients, gathered ZeRO-3 partitions and activations come
    from the heap, whose freed pages stay resident until `malloc_trim`. On a 354 M trainable trunk at ZeRO-3 on 2 CPU
    ranks that kept 1.9 GB per rank above the live tensors at the peak (benchmarks/RESULTS.md). Setting the
    threshold also turns glibc's dynamic adjustment off. The cost is a page fault per page of each new large
    tensor."""
    libc = _glibc()
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes))) if libc else False


def reset_peak_rss() -> bool:
    """Start a new peak: VmHWM := VmRSS (Linux ≥ 4.0, `echo 5 > /proc/self/clear_refs`); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_memory_report(out_dir: Path, rank: int, stage: str, module=None, optimizer=None) -> dict:
    """Add `stage` (e.g. "setup", "trained", "exported") to `out_dir/memory/rank{rank}.json` and start a new peak,
    so each stage's `peak_rss_mib` is the peak since the previous stage; returns the entry."""
    entry = {"rss_mib": rss_mib(), "peak_rss_mib": peak_rss_mib()}
    if module is not None:
        entry.update(tensor_bytes(module, optimizer))
    path = Path(out_dir) / "memory" / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(path.read_text()) if path.exists() else {}
    report[stage] = entry
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    reset_peak_rss()
    return entry
