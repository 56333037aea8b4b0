"""mixdpo-ds: DPO with a latent mixture of K expert policies (Mix-DPO / MoE-DPO), on DeepSpeed.

    from mixdpo_ds import MixDPOConfig, MixDPOTrainer      # TRL's DPOConfig / DPOTrainer shape (README)
    from mixdpo_ds import plan_memory, format_plan         # bytes per rank of a run config (docs/scaling.md)

The names are imported on first use, so `import mixdpo_ds.compat` (or the CLI's --help) stays light.
"""
from __future__ import annotations

_EXPORTS = {
    "MixDPOConfig": "mixdpo_ds.training.trl_config",
    "MixDPOTrainer": "mixdpo_ds.training.trl_trainer",
    "RunConfig": "mixdpo_ds.training.config",
    "load_config": "mixdpo_ds.training.config",
    "TrainerCallback": "mixdpo_ds.training.callbacks",
    "plan_memory": "mixdpo_ds.training.plan",
    "format_plan": "mixdpo_ds.training.plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mixdpo_ds' has no attribute {name!r}")
