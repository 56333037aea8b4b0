"""Layer 3, training: the trainer (Algorithm 1), its config, data, checkpoints, metrics, DeepSpeed, export,
evaluation and generation.

Imports core, kernels and model, never the apps (tests/unit/test_layering.py).
"""
