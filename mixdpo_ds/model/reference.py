"""The frozen reference policy π_ref and the on-disk cache of its sequence log-probs (docs/math.md §1–§2).

The reference never changes, so its log-probs can be computed once over the dataset and reused by every
epoch and every run with the same model, data and lengths: `precompute_reference_logps` keys a file by
`reference_cache_key(...)` and a second call with the same key reads it without running the model.

Shapes: a shared reference gives (2B,) per batch, (num_examples, 2) over the dataset (column 0 chosen,
column 1 rejected); K per-expert references (`models` with different `init_paths`) give (2B, K) and
(num_examples, 2, K). For `lora` and frozen-trunk `heads` the policy itself is the reference
(`PolicyReference`), no second model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mixdpo_ds.model.hf_lm import disable_dropout, head_weight, register_heads_for_zero3, sequence_logps, trunk_hidden

log = logging.getLogger("mixdpo_ds")


class FrozenReference(nn.Module):
    """π_ref from one path (shared, logps (2B,)) or K paths (per expert, logps (2B, K)); eval, no grad.

    K equal paths are loaded once and give the shared (2B,) form: one reference serves all experts. Under ZeRO-3 it
    is built partitioned and run inside an optimizer-less engine (`EngineReference`; training/build.py).
    """

    builtin = False   # a second model, not the policy's own reference

    def __init__(self, model_name_or_path: str | Sequence[str], torch_dtype: torch.dtype = torch.float32,
                 logprob_impl: str = "auto", chunk_size: int | None = None):
        super().__init__()
        paths = [model_name_or_path] if isinstance(model_name_or_path, str) else list(model_name_or_path)
        self.per_expert = len(set(paths)) > 1
        self.paths = paths if self.per_expert else paths[:1]
        self.models = nn.ModuleList(AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype) for p in self.paths)
        for model in self.models:
            disable_dropout(model)
        self.requires_grad_(False)
        self.eval()
        register_heads_for_zero3(self, [head_weight(m) for m in self.models])
        self.logprob_impl = logprob_impl
        self.chunk_size = chunk_size

    def train(self, mode: bool = True):
        return super().train(False)     # always eval: a reference has no dropout

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(2B, T) ids, mask, labels -> (2B,) shared or (2B, K) per-expert fp32 sequence log-probs."""
        out = []
        for model in self.models:
            hidden = trunk_hidden(model.base_model, input_ids, attention_mask)             # (2B, T, H)
            out.append(sequence_logps(hidden, head_weight(model).unsqueeze(0), labels,
                                      self.logprob_impl, self.chunk_size))                  # (2B, 1)
        logps = torch.cat(out, dim=1)                                                       # (2B, K or 1)
        return logps if self.per_expert else logps[:, 0]

    def logps(self, batch: dict) -> torch.Tensor:
        """Reference log-probs of a collated batch (keys input_ids, attention_mask, labels)."""
        device = next(self.parameters()).device
        return self(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device))


class PolicyReference:
    """The built-in reference of a policy (`MixturePolicy.has_builtin_reference`): same `logps(batch)` API. Called
    outside the engine: below ZeRO-3 only (under ZeRO-3 `EngineReference(engine, builtin=True)` runs it)."""

    builtin = True

    def __init__(self, policy):
        if not policy.has_builtin_reference:
            raise ValueError(f"experts.kind={policy.kind!r} with trunk={policy.cfg.trunk!r} has no built-in reference")
        self.policy = policy

    def logps(self, batch: dict) -> torch.Tensor:
        device = next(self.policy.parameters()).device
        return self.policy.reference_logps(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                           batch["labels"].to(device))


class EngineReference:
    """π_ref through a DeepSpeed engine's forward, so that under ZeRO-3 the engine's hooks gather the weights
    (docs/deepspeed.md §7); every rank must call `logps` for every batch, in the same order.

    builtin=True: the policy's engine, run with `reference=True` (`MixturePolicy.reference_logps`: frozen trunk +
    base head, or the base with adapters disabled); builtin=False: an optimizer-less engine of a `FrozenReference`.
    """

    def __init__(self, engine, builtin: bool):
        self.engine = engine
        self.builtin = builtin

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k].to(self.engine.device) for k in ("input_ids", "attention_mask", "labels")}
        return self.engine(**inputs, reference=True) if self.builtin else self.engine(**inputs)


FULL_HASH_BYTES = 2 << 30  # weight files up to 2 GiB are hashed whole (~1-2 s per GiB)
_SAMPLE = 1 << 20


def _file_digest(path: str) -> str:
    """sha256 of the file; above FULL_HASH_BYTES, of its size, mtime and three 1 MiB blocks (start, middle, end)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        else:
            h.update(str(os.stat(path).st_mtime_ns).encode())
            for offset in (0, size // 2, max(0, size - _SAMPLE)):
                f.seek(offset)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


def model_fingerprint(name_or_path: str) -> str:
    """What a model's reference log-probs depend on: for a local directory, a digest of its config and weight files'
    contents (retraining into the same directory changes it); for a hub name, the name itself."""
    if not os.path.isdir(name_or_path):
        return name_or_path
    files = sorted(n for n in os.listdir(name_or_path) if n.endswith((".safetensors", ".bin", ".pt", ".pth"))
                   or n in ("config.json", "generation_config.json"))
    return json.dumps({n: _file_digest(os.path.join(name_or_path, n)) for n in files}, sort_keys=True)


def reference_cache_key(model_name_or_path: str | Sequence[str], data_fingerprint: str, max_length: int,
                        max_prompt_length: int, extra: dict | str | None = None) -> str:
    """sha256 hex of everything the cached log-probs depend on: the model(s) by content (`model_fingerprint`, so
    new weights at the same path get a new key), the data, truncation and `extra` (e.g. dtype, split)."""
    paths = [model_name_or_path] if isinstance(model_name_or_path, str) else list(model_name_or_path)
    payload = json.dumps({"model": [model_fingerprint(p) for p in paths], "data": data_fingerprint,
                          "max_length": max_length,
                          "max_prompt_length": max_prompt_length, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"{key}.safetensors")


def _save_atomic(tensor: torch.Tensor, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"     # per-process tmp: ranks writing the same key never collide
    save_file({"ref_logps": tensor.contiguous()}, tmp)
    os.replace(tmp, path)


def _load_cached(path: str | None) -> torch.Tensor | None:
    if not path or not os.path.exists(path):
        return None
    try:
        return load_file(path)["ref_logps"]
    except Exception as e:  # truncated or corrupt (e.g. a crash of another writer's disk): recompute it
        log.warning("reference cache %s is unreadable (%s: %s); recomputing it", path, type(e).__name__, e)
        return None


@torch.no_grad()
def reference_table(reference, examples: Sequence[dict], collate_fn: Callable[[list], dict], batch_size: int,
                    num_examples: int | None = None) -> torch.Tensor:
    """(num_examples, 2) or (num_examples, 2, K) reference log-probs; row i holds the example whose `index` is i,
    rows of no example given are NaN. num_examples defaults to the largest index + 1."""
    num_examples = num_examples or max(int(ex["index"]) for ex in examples) + 1
    result = None
    for start in range(0, len(examples), batch_size):
        rows = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]   # list or Dataset
        batch = collate_fn(rows)
        logps = reference.logps(batch).float().cpu()                # (2B,) or (2B, K)
        B = len(batch["index"])  # ranked items: m·B rows, response-major (docs/math.md §15)
        pairs = logps.view(-1, B, *logps.shape[1:]).transpose(0, 1)  # (B, 2) or (B, 2, K); ranked (B, m[, K])
        if result is None:
            result = torch.full((num_examples, *pairs.shape[1:]), float("nan"))
        result[torch.as_tensor(batch["index"]).long()] = pairs
    return result


@torch.no_grad()
def precompute_reference_logps(reference, examples: Sequence[dict], collate_fn: Callable[[list], dict],
                               batch_size: int, cache_dir: str | None, key: str | None) -> torch.Tensor:
    """Reference log-probs of every example: (num_examples, 2) [chosen, rejected] or (num_examples, 2, K).

    Row i holds the example whose `index` is i (`collate_fn` must return `index` (B,) and the 2B rows chosen
    first). With a cache_dir and key, an existing `cache_dir/key.safetensors` is loaded without running the
    model; otherwise the result is computed and saved atomically (tmp file + os.replace).
    """
    path = cache_path(cache_dir, key) if cache_dir and key else None
    cached = _load_cached(path)
    if cached is not None:
        return cached
    result = reference_table(reference, examples, collate_fn, batch_size)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        _save_atomic(result, path)
    return result


def shard_positions(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """This rank's share of n examples scored by `world` ranks together -> (positions, how many are its own).

    Rank r owns positions r, r + world, ...; the list is padded with its last position (position 0 when it owns
    none) to ceil(n / world), so that every rank runs the same number of forwards (ZeRO-3: every rank must)."""
    own = list(range(rank, n, world))
    size = -(-n // world)
    return own + [own[-1] if own else 0] * (size - len(own)), len(own)


@torch.no_grad()
def precompute_reference_logps_sharded(reference, examples: Sequence[dict], collate_fn: Callable[[list], dict],
                                       batch_size: int, cache_dir: str | None, key: str | None, rank: int,
                                       world: int, device) -> torch.Tensor:
    """`precompute_reference_logps` by all ranks together (a ZeRO-3 reference: every rank runs every forward).

    Each rank scores its share (`shard_positions`, ~n / world examples), the tables are summed over ranks (every
    row has exactly one owner) and every rank gets the whole table. The cache is read only when every rank can
    read it (else all would not run the same forwards), and rank 0 writes it. `device`: where the collectives
    run (the accelerator under NCCL)."""
    import torch.distributed as dist

    path = cache_path(cache_dir, key) if cache_dir and key else None
    cached = _load_cached(path)
    hit = torch.tensor([float(cached is not None)], device=device)
    dist.all_reduce(hit, op=dist.ReduceOp.MIN)
    if hit.item() == 1.0:
        return cached
    positions, num_own = shard_positions(len(examples), rank, world)
    num_examples = max(int(ex["index"]) for ex in examples) + 1
    table = reference_table(reference, [examples[i] for i in positions], collate_fn, batch_size, num_examples)
    owned = torch.zeros(num_examples, dtype=torch.bool)
    owned[torch.as_tensor([int(examples[i]["index"]) for i in positions[:num_own]], dtype=torch.long)] = True
    owned = owned.view(-1, *[1] * (table.dim() - 1))                  # broadcasts over (2[, K])
    total = torch.where(owned, table, 0.0).to(device)
    count = owned.to(device, torch.float32)
    dist.all_reduce(total)
    dist.all_reduce(count)
    result = torch.where(count.cpu() > 0, total.cpu(), float("nan"))  # rows of no example stay NaN
    if path and rank == 0:
        os.makedirs(cache_dir, exist_ok=True)
        _save_atomic(result, path)
    dist.barrier()
    return result
