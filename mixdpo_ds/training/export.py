"""Export a trained mixture: each expert as a standalone Hugging Face model, plus the gate (`export/`,
docs/ARCHITECTURE.md "Public surface").

Layout of `out_dir` (written to `out_dir.tmp` first, then moved into place with os.replace, so a reader
never sees half an export); `train.export_format` picks experts (default) | compact | both:

    export.json            {"num_experts", "kind", "experts": ExpertsConfig as a dict, "format", "base_model",
                           "layout": the parts written, ["experts"] / ["compact"] / ["experts", "compact"]}
    README.md              the model card of the mixture (training/model_card.py)
    expert_{k}/            expert k as save_pretrained writes it (config.json, generation_config.json,
                           model.safetensors or model-0000i-of-0000n.safetensors + model.safetensors.index.json past
                           train.export_max_shard_size) + the tokenizer + its model card (README.md):
                           AutoModelForCausalLM.from_pretrained works; lora: adapter k alone (adapter_config.json
                           naming the base), loaded with peft.PeftModel.from_pretrained(base, expert_{k})
    merged/expert_{k}/     lora with train.export_merged: the adapter merged into a full model
    gate/                  gating.save_gate (gate.safetensors + gate.json with the user vocabulary)
    compact/               heads kind, export_format compact | both: trunk/ (AutoModel dir, once), heads.safetensors
                           (`heads.{k}`, (V, H) each; sharded with an index like the models), compact.json, the
                           tokenizer; `load_compact` rebuilds the MixturePolicy without K trunk copies

The weights are streamed (training/export_stream.py): one module's parameters gathered at a time (under ZeRO-3 on
every rank, the same order), copied to the CPU on rank 0 into shards of bounded size. Readers (`load_expert`,
`load_experts`, `run_export_dir`, evaluate, generate) accept either layout.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

from mixdpo_ds.model.experts import ExpertsConfig, MixturePolicy
from mixdpo_ds.model.gating import load_gate, save_gate
from mixdpo_ds.training.export_stream import (
    causal_lm_steps,
    compact_head_step,
    gathered,
    head_dtype,
    lora_merged_steps,
    module_steps,
    parse_shard_size,
    write_model,
)

LAYOUTS = ("experts", "compact", "both")
DEFAULT_SHARD_SIZE = "2GB"


def _replace_dir(tmp: str, out_dir: str) -> None:
    """os.replace cannot overwrite a non-empty directory: move the old export aside first, then delete it."""
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old)


def export_from_engine(module, gate, out, tokenizer, user_vocab, zero_stage: int, rank: int, cfg=None):
    """The trainer's export; every rank calls it. Expert parallel: the K heads are gathered first. ZeRO-3: every
    rank walks the modules in the same order, each module's own parameters gathered alone, and rank 0 writes
    (training/export_stream.py); below ZeRO-3 rank 0 alone writes. Layout and shard size: cfg.train."""
    from mixdpo_ds.model.parallel import dense_policy
    from mixdpo_ds.training.distributed import replicated_load

    policy = dense_policy(module)
    if zero_stage == 3 or rank == 0:
        with replicated_load():   # nothing built for the export may be partitioned (docs/deepspeed.md §4)
            export_experts(policy, gate, str(out), tokenizer, user_vocab=user_vocab, cfg=cfg, zero3=zero_stage == 3,
                           rank=rank)
    torch.distributed.barrier()
    return out


def _layout(policy: MixturePolicy, cfg, layout: str | None, compact: bool) -> tuple[bool, bool]:
    """(write expert_k dirs, write compact/) from `layout` (default cfg.train.export_format, else 'experts')."""
    layout = layout or (cfg.train.export_format if cfg is not None else "experts")
    if layout not in LAYOUTS:
        raise ValueError(f"export layout {layout!r}: allowed {list(LAYOUTS)} (train.export_format)")
    experts, with_compact = layout != "compact", layout != "experts" or compact
    if with_compact and policy.kind != "heads":
        raise ValueError(f"the compact export (train.export_format={layout!r}, compact=True) is for "
                         f"experts.kind='heads', not {policy.kind!r}")
    return experts, with_compact


def export_experts(policy: MixturePolicy, gate, out_dir: str, tokenizer=None, compact: bool = False,
                   user_vocab: dict | None = None, cfg=None, merged: bool | None = None, layout: str | None = None,
                   max_shard_size: str | int | None = None, zero3: bool = False, rank: int = 0) -> str:
    """Write the K experts (and the gate, when given) under out_dir atomically, each with a model card; returns
    out_dir. `cfg` (the RunConfig) fills the cards and gives the defaults of `layout` (experts | compact | both;
    compact=True adds compact/) and `max_shard_size`; lora experts are K adapters, and also full merged models
    under merged/ when `merged` (default: cfg.train.export_merged). zero3: every rank calls this, one module's
    parameters gathered at a time, and rank 0 writes."""
    from mixdpo_ds.training.model_card import write_export_card

    experts, with_compact = _layout(policy, cfg, layout, compact)
    size = max_shard_size if max_shard_size is not None else \
        (cfg.train.export_max_shard_size if cfg is not None else DEFAULT_SHARD_SIZE)
    max_bytes = parse_shard_size(size, "train.export_max_shard_size")
    main = rank == 0
    out_dir = out_dir.rstrip("/")
    tmp = f"{out_dir}.tmp"
    if main:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    adapters = policy.kind == "lora"
    merged = (cfg is not None and cfg.train.export_merged) if merged is None else merged
    base = _lora_base(policy, cfg) if adapters else None
    for k in range(policy.num_experts if experts else 0):
        _export_expert(policy, k, tmp, tokenizer, cfg, base, merged, max_bytes, zero3, main)
    if with_compact:
        _export_compact(policy, os.path.join(tmp, "compact"), tokenizer, max_bytes, zero3, main)
    if not main:
        return out_dir
    write_export_card(tmp, cfg, policy.num_experts, adapter=adapters)
    if gate is not None:
        save_gate(gate, gate.cfg, os.path.join(tmp, "gate"), user_vocab=user_vocab)
    with open(os.path.join(tmp, "export.json"), "w") as f:
        json.dump({"num_experts": policy.num_experts, "kind": policy.kind, "experts": asdict(policy.cfg),
                   "format": "adapters" if adapters else "models", "base_model": base,
                   "layout": [name for name, on in (("experts", experts), ("compact", with_compact)) if on]},
                  f, indent=2)
    _replace_dir(tmp, out_dir)
    return out_dir


def _export_expert(policy: MixturePolicy, k: int, tmp: str, tokenizer, cfg, base: str | None, merged: bool,
                   max_bytes: int, zero3: bool, main: bool) -> None:
    """expert_k/ (a full causal LM, or lora adapter k) and, for lora with `merged`, merged/expert_k/."""
    from mixdpo_ds.training.model_card import write_expert_card

    adapters = policy.kind == "lora"
    expert_dir = os.path.join(tmp, f"expert_{k}")
    if adapters:
        name = policy.adapter_names[k]
        with gathered([p for n, p in policy.lora_model.named_parameters() if f".{name}." in f".{n}."], zero3):
            if main:
                save_adapter(policy, k, expert_dir, base)
        dirs = [os.path.join(tmp, "merged", f"expert_{k}")] if merged else []
        for d in dirs:
            write_model(*_model_args(lora_merged_steps(policy, k), d, max_bytes, zero3, main))
    else:
        dirs = [expert_dir]
        write_model(*_model_args(causal_lm_steps(policy, k), expert_dir, max_bytes, zero3, main))
    if not main:
        return
    for d in dict.fromkeys([expert_dir, *dirs]):
        if tokenizer is not None:
            tokenizer.save_pretrained(d)
        write_expert_card(d, cfg, k, policy.num_experts, adapter=adapters and d == expert_dir, base_model=base)


def _model_args(plan, out_dir: str, max_bytes: int, zero3: bool, main: bool) -> tuple:
    steps, config, generation, dtype = plan
    return steps, out_dir, max_bytes, zero3, main, config, generation, dtype


def _lora_base(policy: MixturePolicy, cfg) -> str:
    """The base of lora adapters as a loadable id: the run's model (an absolute path when local)."""
    name = cfg.model.name_or_path if cfg is not None else \
        policy.lora_model.peft_config[policy.adapter_names[0]].base_model_name_or_path
    return os.path.abspath(name) if name and os.path.exists(name) else name


def save_adapter(policy: MixturePolicy, k: int, expert_dir: str, base: str) -> None:
    """Adapter k alone, as peft writes an adapter (adapter_config.json + adapter_model.safetensors), so that
    `PeftModel.from_pretrained(base_model, expert_dir)` loads it (as its 'default' adapter)."""
    import copy

    from peft import get_peft_model_state_dict

    name = policy.adapter_names[k]
    state = get_peft_model_state_dict(policy.lora_model, adapter_name=name)
    os.makedirs(expert_dir, exist_ok=True)
    save_file({n: t.detach().cpu().contiguous() for n, t in state.items()},
              os.path.join(expert_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(policy.lora_model.peft_config[name])
    config.base_model_name_or_path = base
    config.inference_mode = True
    config.save_pretrained(expert_dir)


def _export_compact(policy: MixturePolicy, compact_dir: str, tokenizer, max_bytes: int, zero3: bool,
                    main: bool) -> None:
    """trunk/ (an AutoModel directory, streamed like an expert) + heads.safetensors (`heads.{k}`: (V, H) each,
    low-rank heads merged W + A_k B_k; sharded with an index past max_bytes) + compact.json."""
    trunk_config = copy.deepcopy(policy.config)
    trunk_config.architectures = [type(policy.trunk).__name__]
    dtype = next(policy.trunk.parameters()).dtype
    write_model(module_steps(policy.trunk), os.path.join(compact_dir, "trunk"), max_bytes, zero3, main, trunk_config,
                dtype=dtype)
    write_model([compact_head_step(policy)], compact_dir, max_bytes, zero3, main, dtype=head_dtype(policy),
                prefix="heads")
    if not main:
        return
    with open(os.path.join(compact_dir, "compact.json"), "w") as f:
        json.dump({"num_experts": policy.num_experts, "causal_lm_config": policy.config.to_dict()}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(compact_dir)


def run_export_dir(run_dir: str) -> Path:
    """`run_dir/export`, checked: a clear error naming what is missing (the run, or its export) before any
    from_pretrained call turns a missing directory into a hub lookup ("Repo id must be …"). Either layout
    (expert_k/ directories, compact/, or both) is accepted."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} not found")
    export = run / "export"
    if not (export / "export.json").is_file() or not ((export / "expert_0").is_dir() or has_compact(export)):
        raise FileNotFoundError(f"{export}: the run has no export (it is written at the end of training with "
                                "train.export=true, the default; a run that stopped early or had train.export=false "
                                "has none)")
    return export


def has_compact(out_dir: str | Path) -> bool:
    return (Path(out_dir) / "compact" / "compact.json").is_file()


def export_tokenizer_dir(out_dir: str | Path) -> Path:
    """The directory of an export that holds the tokenizer: expert_0/, or compact/ in a compact-only export."""
    expert = Path(out_dir) / "expert_0"
    return expert if expert.is_dir() else Path(out_dir) / "compact"


def export_model_config(out_dir: str | Path):
    """The causal LM config of expert 0 (positions, vocabulary), from either layout."""
    from transformers import AutoConfig

    expert = Path(out_dir) / "expert_0"
    if expert.is_dir():
        return AutoConfig.from_pretrained(str(expert))
    return AutoConfig.from_pretrained(str(Path(out_dir) / "compact" / "trunk"))


def load_expert(out_dir: str, k: int, torch_dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Expert k of an export as a plain causal LM (for generate); a lora adapter is merged into its base; a
    compact-only export builds it from the trunk + head k."""
    expert_dir = os.path.join(out_dir, f"expert_{k}")
    if os.path.isfile(os.path.join(expert_dir, "adapter_config.json")):
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(expert_dir).base_model_name_or_path
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype), expert_dir)
        return model.merge_and_unload().eval()
    if not os.path.isdir(expert_dir) and has_compact(out_dir):
        compact_dir = os.path.join(out_dir, "compact")
        trunk = AutoModel.from_pretrained(os.path.join(compact_dir, "trunk"), dtype=torch_dtype)
        head = _read_heads(compact_dir, [k])[0].to(torch_dtype)                              # (V, H)
        cfg = ExpertsConfig(kind="heads", num_experts=1, trunk="frozen")
        return MixturePolicy(cfg, trunk.config, trunk=trunk, heads=head[None]).expert_model(0)
    return AutoModelForCausalLM.from_pretrained(expert_dir, dtype=torch_dtype).eval()


def load_trunk(out_dir: str, torch_dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Expert 0's trunk (what a `moe` gate reads): compact/trunk/ when the export has it, else expert 0's."""
    if has_compact(out_dir):
        return AutoModel.from_pretrained(os.path.join(out_dir, "compact", "trunk"), dtype=torch_dtype).eval()
    return load_expert(out_dir, 0, torch_dtype).base_model


def load_experts(out_dir: str, torch_dtype: torch.dtype = torch.float32, logprob_impl: str = "auto") -> MixturePolicy:
    """All K experts of an export as a `models`-kind MixturePolicy (for evaluate), whatever kind was trained; a
    compact-only export as its `heads` policy (`load_compact`)."""
    with open(os.path.join(out_dir, "export.json")) as f:
        num_experts = json.load(f)["num_experts"]
    if not os.path.isdir(os.path.join(out_dir, "expert_0")) and has_compact(out_dir):
        return load_compact(out_dir, torch_dtype, logprob_impl)
    models = [load_expert(out_dir, k, torch_dtype) for k in range(num_experts)]
    cfg = ExpertsConfig(kind="models", num_experts=num_experts, logprob_impl=logprob_impl)
    return MixturePolicy(cfg, models[0].config, models=models).eval()


def _read_heads(compact_dir: str, ks: list[int]) -> list[torch.Tensor]:
    """Heads ks (each (V, H)) of compact/: `heads.{k}` in heads.safetensors or its shards (index), or the
    (K, V, H) `heads` tensor of exports written before the heads were streamed."""
    from safetensors import safe_open

    index = os.path.join(compact_dir, "heads.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = {key: os.path.join(compact_dir, name) for key, name in json.load(f)["weight_map"].items()}
    else:
        files = {f"heads.{k}": os.path.join(compact_dir, "heads.safetensors") for k in ks}
    out = []
    for k in ks:
        with safe_open(files[f"heads.{k}"], framework="pt") as f:
            out.append(f.get_tensor(f"heads.{k}") if f"heads.{k}" in f.keys() else f.get_slice("heads")[k])
    return out


def load_compact(out_dir: str, torch_dtype: torch.dtype = torch.float32, logprob_impl: str = "auto") -> MixturePolicy:
    """The compact heads export as a frozen-trunk `heads` MixturePolicy: one trunk, (K, V, H) heads."""
    compact_dir = os.path.join(out_dir, "compact")
    with open(os.path.join(compact_dir, "compact.json")) as f:
        meta = json.load(f)
    trunk = AutoModel.from_pretrained(os.path.join(compact_dir, "trunk"), dtype=torch_dtype)
    heads = torch.stack(_read_heads(compact_dir, list(range(meta["num_experts"])))).to(torch_dtype)   # (K, V, H)
    cfg = ExpertsConfig(kind="heads", num_experts=meta["num_experts"], trunk="frozen", logprob_impl=logprob_impl)
    return MixturePolicy(cfg, trunk.config, trunk=trunk, heads=heads).eval()


def load_export_gate(out_dir: str):
    """(gate, gate.json dict) of an export, or (None, None) when it has no gate."""
    gate_dir = os.path.join(out_dir, "gate")
    if not os.path.exists(gate_dir):
        return None, None
    return load_gate(gate_dir, with_meta=True)
