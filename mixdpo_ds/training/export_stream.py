"""The export's weight writer: one module gathered at a time, bounded safetensors shards, transformers' index
(docs/deepspeed.md §2, "Export under ZeRO-3").

A model is written as a list of `Step`s: the parameters to gather (one module's own, or the few inputs of an
expert head) and the (state-dict key, tensor) pairs made from them. Every rank runs every step in the same order:
under ZeRO-3 each step is one `deepspeed.zero.GatheredParameters(params, modifier_rank=None)`, a collective, and
only rank 0 (the rank with a `ShardWriter`) copies the tensors to the CPU in the export dtype. The writer writes a
shard when the next tensor would pass the size limit, and at the end names the shards as `save_pretrained` does
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`; one shard: `model.safetensors`).
Peak memory: one module gathered on every rank, plus one shard of CPU copies on rank 0.

    steps = causal_lm_steps(policy, k)                       # expert k of a heads / models policy
    write_model(steps, "out/expert_0", max_bytes=2 * 10**9, zero3=True, main=rank == 0)
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_shard_size(value, key: str = "max_shard_size") -> int:
    """'2GB' / '500MB' / '64KiB' / an int (bytes) -> bytes (>= 1); an error naming `key` otherwise."""
    match = None if isinstance(value, (bool, int)) else re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*",
                                                                      str(value))
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif match and match.group(2).upper() in _UNITS:
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    else:
        size = 0
    if size < 1:
        raise ValueError(f"{key}={value!r}: expected a size such as '2GB', '500MB', '64KiB' or a number of bytes "
                         f">= 1 (units {[u for u in _UNITS if u]})")
    return size


class ShardWriter:
    """(key, CPU tensor) pairs in; safetensors shards of at most `max_bytes` out (a tensor bigger than that gets a
    shard of its own, as in transformers). `close()` names the shards and writes the index."""

    def __init__(self, out_dir: str, max_bytes: int, prefix: str = "model"):
        self.out_dir, self.max_bytes, self.prefix = out_dir, max_bytes, prefix
        self._shard: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._files: list[str] = []
        self._file_of: dict[str, int] = {}
        self.total_bytes = self.total_numel = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._file_of or key in self._shard:
            raise ValueError(f"{self.out_dir}: the key {key!r} was written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard and self._bytes + nbytes > self.max_bytes:
            self._flush()
        self._shard[key] = tensor.contiguous()
        self._bytes += nbytes
        self.total_bytes += nbytes
        self.total_numel += tensor.numel()

    def _flush(self) -> None:
        path = os.path.join(self.out_dir, f"{self.prefix}.part{len(self._files)}.safetensors")  # renamed in close
        save_file(self._shard, path, metadata={"format": "pt"})
        self._file_of.update(dict.fromkeys(self._shard, len(self._files)))
        self._files.append(path)
        self._shard, self._bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give the shards their final names; -> the file names."""
        if self._shard or not self._files:
            self._flush()
        n = len(self._files)
        names = [f"{self.prefix}.safetensors"] if n == 1 else \
            [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for path, name in zip(self._files, names, strict=True):
            os.replace(path, os.path.join(self.out_dir, name))
        if n > 1:
            index = {"metadata": {"total_parameters": self.total_numel, "total_size": self.total_bytes},
                     "weight_map": {key: names[i] for key, i in sorted(self._file_of.items())}}
            with open(os.path.join(self.out_dir, f"{self.prefix}.safetensors.index.json"), "w") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


@dataclass
class Step:
    """Parameters gathered together, and the (key, tensor) pairs written from them (made inside the gather)."""

    params: list[nn.Parameter]
    keys: list[str]
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]] = field(repr=False)


def module_steps(root: nn.Module, prefix: str = "") -> list[Step]:
    """One step per module of `root` that owns state: its own parameters and persistent buffers, keyed
    prefix + `root.state_dict()` key. A tensor shared by two modules (tied weights) is written once, under its
    first key, as save_pretrained writes tied weights."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    seen: set[int] = set()
    for key, tensor in root.state_dict(keep_vars=True).items():  # the tensors themselves: nothing is copied
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        groups.setdefault(key.rpartition(".")[0], []).append((prefix + key, tensor))
    return [Step([t for _, t in items if isinstance(t, nn.Parameter)], [k for k, _ in items],
                 lambda items=items: iter(items)) for items in groups.values()]


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], zero3: bool):
    """Full values of `params` inside the block on every rank (ZeRO-3: a collective); a no-op otherwise."""
    if not zero3 or not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def stream(steps: list[Step], writer: ShardWriter | None, dtype: torch.dtype | None, zero3: bool) -> None:
    """Run every step (all ranks, same order); the rank with a writer copies each tensor to the CPU: floating
    tensors in `dtype` (None: their own), others as they are."""
    for step in steps:
        with gathered(step.params, zero3):
            if writer is None:
                continue
            for key, tensor in step.tensors():
                cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                writer.add(key, tensor.detach().to("cpu", dtype=cast, copy=True))


def write_model(steps: list[Step], out_dir: str, max_bytes: int, zero3: bool, main: bool, config=None,
                generation_config=None, dtype: torch.dtype | None = None, prefix: str = "model") -> None:
    """Stream `steps` into out_dir (rank `main` writes; every rank gathers), then config.json (its dtype set to
    the export dtype, as save_pretrained does) and generation_config.json when given."""
    writer = None
    if main:
        os.makedirs(out_dir, exist_ok=True)
        writer = ShardWriter(out_dir, max_bytes, prefix)
    stream(steps, writer, dtype, zero3)
    if not main:
        return
    writer.close()
    if config is not None:
        if dtype is not None:
            config.dtype = str(dtype).split(".")[1]
        config.save_pretrained(out_dir)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)


def _skeleton(config):
    """The causal LM of `config` on the meta device (no memory, no RNG draws): its key names and generation
    config. The class's constructor, not from_config (which would partition it under a live ZeRO-3 config)."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)


def _state_keys(model: nn.Module) -> list[str]:
    """state_dict keys without the repeats of tied tensors (what save_pretrained writes)."""
    return [k for step in module_steps(model) for k in step.keys]


def head_inputs(policy) -> list[nn.Parameter]:
    """The parameters the K expert heads of a `heads` policy are made from (gathered together for a head)."""
    if policy.lowrank_heads is not None:
        params = list(policy.lowrank_heads.parameters())
    else:
        params = [] if policy.tied_head else [policy.heads]
    shared = policy._shared_head() if policy.lowrank_heads is not None or policy.tied_head else None
    return params + ([shared] if isinstance(shared, nn.Parameter) else [])


def head_dtype(policy) -> torch.dtype:
    return (policy.heads if policy.heads is not None else policy._shared_head()).dtype


def causal_lm_steps(policy, k: int):
    """(steps, config, generation_config, dtype) of expert k as the causal LM `policy.expert_model(k)` builds:
    `models`: model k itself; `heads`: the trunk under the causal LM's base-model prefix + head k (W + A_k B_k
    merged for low-rank heads), untied. The keys are checked against the causal LM's own before anything runs."""
    if policy.kind == "models":
        model = policy.models[k]
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        generation = model.generation_config if model.can_generate() else None
        return module_steps(model), config, generation, next(model.parameters()).dtype
    if policy.kind != "heads":
        raise ValueError(f"experts.kind={policy.kind!r}: a streamed causal LM needs kind 'heads' or 'models'")
    config = copy.deepcopy(policy.config)
    config.tie_word_embeddings = False
    skeleton = _skeleton(config)
    config.architectures = [type(skeleton).__name__]
    head = skeleton.get_output_embeddings().weight
    head_key = next(n for n, p in skeleton.named_parameters() if p is head)
    steps = module_steps(policy.trunk, f"{skeleton.base_model_prefix}.")
    steps.append(Step(head_inputs(policy), [head_key], lambda: iter([(head_key, policy.expert_head(k))])))
    generation = skeleton.generation_config if skeleton.can_generate() else None
    return _checked(steps, skeleton, f"expert {k}"), config, generation, head_dtype(policy)


def compact_head_step(policy) -> Step:
    """All K heads as `heads.{k}` (V, H) tensors, one at a time (a low-rank head merged when its turn comes)."""
    keys = [f"heads.{k}" for k in range(policy.num_experts)]
    return Step(head_inputs(policy), keys,
                lambda: ((key, policy.expert_head(k)) for k, key in enumerate(keys)))


def _checked(steps: list[Step], skeleton, what: str) -> list[Step]:
    got, want = [key for s in steps for key in s.keys], _state_keys(skeleton)
    if sorted(got) != sorted(want):
        raise ValueError(f"{what}: the streamed keys do not match {type(skeleton).__name__}'s (missing "
                         f"{sorted(set(want) - set(got))[:5]}, unexpected {sorted(set(got) - set(want))[:5]})")
    return steps


def lora_merged_steps(policy, k: int):
    """(steps, config, generation_config, dtype) of lora expert k merged into its base, as
    `merge_and_unload` writes it: every LoRA layer's base weight W + ΔW_k (peft's `get_delta_weight`), gathered
    per layer with adapter k's A and B; the other adapters are left out."""
    from mixdpo_ds.compat import lora_layers

    model = policy.lora_model.base_model.model                      # the base causal LM holding the LoRA layers
    name = policy.adapter_names[k]
    layers = {id(m) for m in lora_layers(policy.lora_model)}
    steps = []
    for path, module in model.named_modules():
        if id(module) not in layers or name not in getattr(module, "lora_A", {}):
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(name):
            raise ValueError(f"{path}: merging DoRA / lora_bias adapters is not supported by the streamed export")
    for step in module_steps(model):
        owner = step.keys[0].rpartition(".")[0]
        if ".lora_" in f".{owner}":
            continue                                                  # adapters: merged into their layer below
        layer = model.get_submodule(owner[:-len(".base_layer")]) if owner.endswith(".base_layer") else None
        if layer is None or id(layer) not in layers or name not in layer.lora_A:
            steps.append(step)
            continue
        adapter = [p for n, p in layer.named_parameters() if f".{name}." in f".{n}."]
        steps.append(Step(step.params + adapter, [key.replace(".base_layer.", ".") for key in step.keys],
                          lambda step=step, layer=layer: _merged(step, layer, name)))
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    generation = model.generation_config if model.can_generate() else None
    return _checked(steps, _skeleton(config), f"lora expert {k}"), config, generation, next(model.parameters()).dtype


def _merged(step: Step, layer, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in step.tensors():
        out = key.replace(".base_layer.", ".")
        yield out, (tensor + layer.get_delta_weight(name).to(tensor.dtype) if out.endswith(".weight") else tensor)


__all__ = ["ShardWriter", "Step", "causal_lm_steps", "compact_head_step", "gathered", "head_dtype", "head_inputs",
           "lora_merged_steps", "module_steps", "parse_shard_size", "stream", "write_model"]
