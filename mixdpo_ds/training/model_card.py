"""Model cards (README.md with Hub metadata) for an export: one per expert directory and one for the export root.

Each card says what the expert is (expert k of K, the kind, the gate), what it was trained on (data, β, steps),
how to load it (transformers, or peft for a lora adapter on its base) and cites the paper. The metadata block is
`huggingface_hub.ModelCardData` (base_model, library_name, tags, datasets), so the Hub indexes it.

    write_expert_card(out_dir / "expert_0", cfg, k=0, num_experts=2, adapter=True, base_model="gpt2")
"""
from __future__ import annotations

import os
from pathlib import Path

CITATION = """@misc{bohne2025mixmoedpo,
  title  = {Mix- and MoE-DPO: A Variational Inference Approach to Direct Preference Optimization},
  author = {Bohne, Jason and Polak, Pawe{\\l} and Rosenberg, David and Bloniarz, Brian and Kazantsev, Gary},
  year   = {2025}
}"""


def _hub_id(name: str | None) -> str | None:
    """A Hub repo id, or None for a local path (a card's base_model must be a Hub id)."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def _dataset_id(cfg) -> str | None:
    return _hub_id(cfg.data.path) if cfg is not None else None


def _facts(cfg, num_experts: int) -> str:
    if cfg is None:
        return f"- experts: K = {num_experts}\n"
    t, g = cfg.train, cfg.gate
    gate = "a global weight vector (Mix-DPO)" if g.kind == "mix" else f"a gating network of the {g.features} (MoE-DPO)"
    return (f"- experts: K = {num_experts}, kind `{cfg.experts.kind}`\n"
            f"- gate: {gate}\n"
            f"- base model: `{cfg.model.name_or_path}`\n"
            f"- data: `{cfg.data.path}` (split `{cfg.data.split}`), max_length {cfg.data.max_length}\n"
            f"- β = {cfg.loss.beta}, E-step `{cfg.em.mode}`, learning rate {t.lr}, schedule `{t.lr_schedule}`\n")


def _card(title: str, body: str, metadata) -> str:
    from huggingface_hub import ModelCard

    text = f"---\n{metadata.to_yaml()}\n---\n\n# {title}\n\n{body}\n## Citation\n\n```bibtex\n{CITATION}\n```\n"
    ModelCard(text)  # parses the metadata block: a malformed card fails here, not on the Hub
    return text


def write_expert_card(expert_dir: str | Path, cfg, k: int, num_experts: int, adapter: bool,
                      base_model: str | None = None) -> Path:
    """README.md of expert k: a full causal LM, or (adapter=True) a LoRA adapter on `base_model`."""
    from huggingface_hub import ModelCardData

    base = base_model or (cfg.model.name_or_path if cfg is not None else None)
    tags = ["mixdpo", "dpo", "mixture-of-experts", "trl"] + (["lora"] if adapter else [])
    meta = ModelCardData(base_model=_hub_id(base), library_name="peft" if adapter else "transformers", tags=tags,
                         datasets=[d] if (d := _dataset_id(cfg)) else None, pipeline_tag="text-generation")
    if adapter:
        load = ("```python\nfrom peft import PeftModel\n"
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
                "model = PeftModel.from_pretrained(base, PATH_OR_REPO)   # this directory\n"
                "tokenizer = AutoTokenizer.from_pretrained(PATH_OR_REPO)\n"
                "merged = model.merge_and_unload()                       # optional: one plain model\n```\n")
    else:
        load = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "model = AutoModelForCausalLM.from_pretrained(PATH_OR_REPO)   # this directory\n"
                "tokenizer = AutoTokenizer.from_pretrained(PATH_OR_REPO)\n```\n")
    body = (f"Expert {k} of a mixture of {num_experts} DPO policies trained with "
            "mixdpo-ds by variational EM (Mix- / MoE-DPO): each preference pair is assigned "
            "softly to the experts by its posterior responsibility, and each expert is a DPO policy on its share.\n\n"
            f"{_facts(cfg, num_experts)}\n## How to load\n\n{load}\n"
            "The gate that mixes the experts is in the export's `gate/` directory (`mixdpo generate --run DIR "
            "--route sample` samples from the mixture).\n")
    path = Path(expert_dir) / "README.md"
    path.write_text(_card(f"Mix-DPO expert {k} of {num_experts}", body, meta))
    return path


def write_export_card(out_dir: str | Path, cfg, num_experts: int, adapter: bool) -> Path:
    """README.md of the export root: the K experts, the gate and how to use them together."""
    from huggingface_hub import ModelCardData

    base = cfg.model.name_or_path if cfg is not None else None
    meta = ModelCardData(base_model=_hub_id(base), library_name="peft" if adapter else "transformers",
                         tags=["mixdpo", "dpo", "mixture-of-experts", "trl"],
                         datasets=[d] if (d := _dataset_id(cfg)) else None)
    experts = "\n".join(f"- `expert_{k}/`: {'a LoRA adapter' if adapter else 'a causal LM'} (its own model card)"
                        for k in range(num_experts))
    body = (f"A mixture of {num_experts} DPO expert policies (Mix- / MoE-DPO) and its gate.\n\n"
            f"{_facts(cfg, num_experts)}\n## Contents\n\n{experts}\n- `gate/`: the gating weights "
            "(`mixdpo_ds.model.gating.load_gate`)\n- `export.json`: K and the expert kind\n\n## How to use\n\n"
            "```bash\nmixdpo generate --run RUN_DIR --prompt \"...\" --route sample   # z ~ w(x), then expert z\n"
            "mixdpo evaluate --run RUN_DIR --data pairs.jsonl --out scores.jsonl\n```\n")
    path = Path(out_dir) / "README.md"
    path.write_text(_card(f"Mix-DPO mixture of {num_experts} experts", body, meta))
    return path


__all__ = ["CITATION", "write_expert_card", "write_export_card"]
