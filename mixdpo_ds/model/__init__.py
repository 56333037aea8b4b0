"""Layer 2, the model: K experts on a Hugging Face model, the gate, the reference, expert parallelism.

Imports the core math and the kernels, never the training layer (tests/unit/test_layering.py).
"""
