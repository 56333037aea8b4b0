"""Layer 1, the math: pure tensor functions of docs/math.md (losses, E-step, Gumbel relaxation, EM schedules,
mixture-collapse detectors).

Imports nothing from the rest of mixdpo_ds (tests/unit/test_layering.py checks it).
"""
