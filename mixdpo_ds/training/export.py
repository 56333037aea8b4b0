"""Export a trained mixture: each expert as a standalone Hugging Face model, plus the gate (`export/`,
docs/ARCHITECTURE.md "Public surface").

Layout of `out_dir` (written to `out_dir.tmp` first, then moved into place with os.replace, so a reader
never sees half an export):

    export.json            {"num_experts", "kind", "experts": ExpertsConfig as a dict, "format", "base_model"}
    README.md              the model card of the mixture (training/model_card.py)
    expert_{k}/            save_pretrained of expert k + the tokenizer + its model card (README.md):
                           AutoModelForCausalLM.from_pretrained works; lora: adapter k alone (adapter_config.json
                           naming the base), loaded with peft.PeftModel.from_pretrained(base, expert_{k})
    merged/expert_{k}/     lora with train.export_merged: the adapter merged into a full model
    gate/                  gating.save_gate (gate.safetensors + gate.json with the user vocabulary)
    compact/               heads kind, compact=True: trunk/ (AutoModel dir, once), heads.safetensors (K, V, H),
                           compact.json; `load_compact` rebuilds the MixturePolicy without K trunk copies

Under DeepSpeed ZeRO-3 call this with full weights (after `zero_to_fp32` / a gathered copy), on one rank.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

from mixdpo_ds.model.experts import ExpertsConfig, MixturePolicy
from mixdpo_ds.model.gating import load_gate, save_gate


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
    """The trainer's export; every rank calls it. Expert parallel: the K heads are gathered first. ZeRO-3: the
    full weights are gathered on every rank and written by rank 0. The standalone expert models are built on rank
    0 alone, never under zero.Init (`replicated_load`)."""
    from mixdpo_ds.model.parallel import dense_policy
    from mixdpo_ds.training.distributed import replicated_load

    policy = dense_policy(module)
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None):
            if rank == 0:
                with replicated_load():
                    export_experts(policy, gate, str(out), tokenizer, user_vocab=user_vocab, cfg=cfg)
    elif rank == 0:
        export_experts(policy, gate, str(out), tokenizer, user_vocab=user_vocab, cfg=cfg)
    torch.distributed.barrier()
    return out


def export_experts(policy: MixturePolicy, gate, out_dir: str, tokenizer=None, compact: bool = False,
                   user_vocab: dict | None = None, cfg=None, merged: bool | None = None) -> str:
    """Write the K experts (and the gate, when given) under out_dir atomically, each with a model card; returns
    out_dir. `cfg` (the RunConfig) fills the cards; lora experts are K adapters, and also full merged models under
    merged/ when `merged` (default: cfg.train.export_merged)."""
    from mixdpo_ds.training.model_card import write_expert_card, write_export_card

    out_dir = out_dir.rstrip("/")
    tmp = f"{out_dir}.tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    adapters = policy.kind == "lora"
    merged = (cfg is not None and cfg.train.export_merged) if merged is None else merged
    base = _lora_base(policy, cfg) if adapters else None
    for k in range(policy.num_experts):
        expert_dir = os.path.join(tmp, f"expert_{k}")
        dirs = [os.path.join(tmp, "merged", f"expert_{k}")] if adapters and merged else []
        if adapters:
            save_adapter(policy, k, expert_dir, base)
        else:
            dirs.append(expert_dir)
        for d in dirs:
            policy.expert_model(k).save_pretrained(d)
        for d in dict.fromkeys([expert_dir, *dirs]):
            if tokenizer is not None:
                tokenizer.save_pretrained(d)
            write_expert_card(d, cfg, k, policy.num_experts, adapter=adapters and d == expert_dir, base_model=base)
    write_export_card(tmp, cfg, policy.num_experts, adapter=adapters)
    if gate is not None:
        save_gate(gate, gate.cfg, os.path.join(tmp, "gate"), user_vocab=user_vocab)
    if compact:
        if policy.kind != "heads":
            raise ValueError(f"export compact=True is for experts.kind='heads', not {policy.kind!r}")
        _export_compact(policy, os.path.join(tmp, "compact"), tokenizer)
    with open(os.path.join(tmp, "export.json"), "w") as f:
        json.dump({"num_experts": policy.num_experts, "kind": policy.kind, "experts": asdict(policy.cfg),
                   "format": "adapters" if adapters else "models", "base_model": base}, f, indent=2)
    _replace_dir(tmp, out_dir)
    return out_dir


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


def _export_compact(policy: MixturePolicy, compact_dir: str, tokenizer) -> None:
    policy.trunk.save_pretrained(os.path.join(compact_dir, "trunk"))
    heads = policy.dense_heads().cpu().contiguous()  # (K, V, H); low-rank heads merged: W + A_k B_k
    save_file({"heads": heads}, os.path.join(compact_dir, "heads.safetensors"))
    with open(os.path.join(compact_dir, "compact.json"), "w") as f:
        json.dump({"num_experts": policy.num_experts, "causal_lm_config": policy.config.to_dict()}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(compact_dir)


def run_export_dir(run_dir: str) -> Path:
    """`run_dir/export`, checked: a clear error naming what is missing (the run, or its export) before any
    from_pretrained call turns a missing directory into a hub lookup ("Repo id must be …")."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} not found")
    export = run / "export"
    if not (export / "export.json").is_file() or not (export / "expert_0").is_dir():
        raise FileNotFoundError(f"{export}: the run has no export (it is written at the end of training with "
                                "train.export=true, the default; a run that stopped early or had train.export=false "
                                "has none)")
    return export


def load_expert(out_dir: str, k: int, torch_dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Expert k of an export as a plain causal LM (for generate); a lora adapter is merged into its base."""
    expert_dir = os.path.join(out_dir, f"expert_{k}")
    if os.path.isfile(os.path.join(expert_dir, "adapter_config.json")):
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(expert_dir).base_model_name_or_path
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype), expert_dir)
        return model.merge_and_unload().eval()
    return AutoModelForCausalLM.from_pretrained(expert_dir, dtype=torch_dtype).eval()


def load_experts(out_dir: str, torch_dtype: torch.dtype = torch.float32, logprob_impl: str = "auto") -> MixturePolicy:
    """All K experts of an export as a `models`-kind MixturePolicy (for evaluate), whatever kind was trained."""
    with open(os.path.join(out_dir, "export.json")) as f:
        num_experts = json.load(f)["num_experts"]
    models = [load_expert(out_dir, k, torch_dtype) for k in range(num_experts)]
    cfg = ExpertsConfig(kind="models", num_experts=num_experts, logprob_impl=logprob_impl)
    return MixturePolicy(cfg, models[0].config, models=models).eval()


def load_compact(out_dir: str, torch_dtype: torch.dtype = torch.float32, logprob_impl: str = "auto") -> MixturePolicy:
    """The compact heads export as a frozen-trunk `heads` MixturePolicy: one trunk, (K, V, H) heads."""
    compact_dir = os.path.join(out_dir, "compact")
    with open(os.path.join(compact_dir, "compact.json")) as f:
        meta = json.load(f)
    trunk = AutoModel.from_pretrained(os.path.join(compact_dir, "trunk"), dtype=torch_dtype)
    heads = load_file(os.path.join(compact_dir, "heads.safetensors"))["heads"].to(torch_dtype)
    cfg = ExpertsConfig(kind="heads", num_experts=meta["num_experts"], trunk="frozen", logprob_impl=logprob_impl)
    return MixturePolicy(cfg, trunk.config, trunk=trunk, heads=heads).eval()


def load_export_gate(out_dir: str):
    """(gate, gate.json dict) of an export, or (None, None) when it has no gate."""
    gate_dir = os.path.join(out_dir, "gate")
    if not os.path.exists(gate_dir):
        return None, None
    return load_gate(gate_dir, with_meta=True)
