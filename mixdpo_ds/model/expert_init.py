"""How the experts start: the Gaussian noise that breaks the symmetry of K copies (`experts.init_noise`, docs/math.md
§1) and the K LoRA adapters of the `lora` kind. Used by `experts.build_policy`."""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import PreTrainedModel

from mixdpo_ds.model.hf_lm import gathered


def add_noise_(tensor: torch.Tensor, rel_std: float, generator: torch.Generator, ref: torch.Tensor = None) -> None:
    """tensor += N(0, (rel_std · std(ref))²) in place; ref defaults to the tensor itself."""
    ref = tensor if ref is None else ref
    scale = rel_std * ref.detach().float().std()
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * scale
    with torch.no_grad():
        tensor.add_(noise.to(tensor.dtype).to(tensor.device))


def build_lora(base: PreTrainedModel, cfg, seed: int) -> nn.Module:
    """K peft LoRA adapters expert_0..expert_{K-1} on `base` (cfg: an ExpertsConfig); only lora_* params train."""
    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules,
                          lora_dropout=cfg.lora_dropout, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)     # peft draws lora_A from the global RNG
        model = get_peft_model(base, lora_cfg, adapter_name="expert_0")
        for k in range(1, cfg.num_experts):
            model.add_adapter(f"expert_{k}", lora_cfg)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def lora_noise_(model: nn.Module, rel_std: float, generator: torch.Generator) -> None:
    """Noise on each lora_B, scaled by its base layer's weight std. Under ZeRO-3 the base weight is partitioned at
    load (empty here: its std would be NaN), so it is gathered to read it; the adapters are not partitioned yet and
    every rank draws the same noise (same generator seed)."""
    for module in model.modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict) and hasattr(module, "get_base_layer"):
            base_weight = module.get_base_layer().weight
            with gathered([base_weight]):
                for linear in lora_b.values():
                    add_noise_(linear.weight, rel_std, generator, ref=base_weight)


def noise_model_(model: nn.Module, rel_std: float, generator: torch.Generator) -> None:
    for p in model.parameters():
        with gathered([p], modify=True):
            if p.ndim >= 2:
                add_noise_(p, rel_std, generator)
