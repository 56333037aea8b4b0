"""Kernel tests run the Triton kernels under the interpreter on CPU (SPEC §3).

TRITON_INTERPRET must be set before the `@triton.jit` decorators of mixdpo_ds.kernels' Triton modules run;
those modules are imported lazily (on the first impl="triton" call), so setting it here, at collection, is
early enough even when other test modules imported triton or mixdpo_ds.kernels first. `setdefault`: on a GPU
machine benchmarks/gpu_check.sh sets TRITON_INTERPRET=0 to test the compiled kernels.
"""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")



@pytest.fixture(autouse=True)
def one_thread():
    """Small shapes on a shared 2-core machine: one thread avoids OpenMP oversubscription stalls (a 27 s test
    took 0.1 s). Restored afterwards so other test directories keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
