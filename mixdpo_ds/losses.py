"""The stable public path of the loss functions: `mixdpo_ds.losses.mixdpo_loss`, `dpo_loss`, ... (docs/math.md).

They live in `mixdpo_ds.core.losses`; this module re-exports that module's public names.
"""
from mixdpo_ds.core.losses import *  # noqa: F401,F403
from mixdpo_ds.core.losses import __all__  # noqa: F401
