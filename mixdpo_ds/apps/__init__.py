"""Layer 4, applications: the demo and its report, the paper recipe, SFT, tiny model builders, synthetic data.

Built on the training layer; nothing below imports from here (tests/unit/test_layering.py).
"""
