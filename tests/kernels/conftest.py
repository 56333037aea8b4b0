"""Kernel tests run the Triton kernels under the interpreter on CPU (docs/deepspeed.md §11).

`@triton.jit` picks interpreter or compiler when the decorator runs, which happens at import: for our kernels
(mixdpo_ds.kernels imports its Triton modules lazily, on the first impl="triton" call, so setting
TRITON_INTERPRET here, at collection, is early enough) and for Triton's own library functions (tl.zeros, tl.sum,
...) when `triton` is first imported. In a full `pytest tests` run an earlier test module has usually imported
triton already (deepspeed does), so those are re-imported below. `setdefault`: on a GPU machine
benchmarks/gpu_check.sh sets TRITON_INTERPRET=0 to test the compiled kernels.
"""
import importlib
import os
import sys

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


def _interpret_triton_library() -> None:
    """Re-import triton.language's @jit library if triton was imported before TRITON_INTERPRET=1: the interpreter
    cannot call its compiled-mode objects ("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    if os.environ["TRITON_INTERPRET"] != "1" or "triton" not in sys.modules:
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        for name in ("triton.language.standard", "triton.language.random", "triton.language"):
            importlib.reload(sys.modules[name])


_interpret_triton_library()


@pytest.fixture(autouse=True)
def one_thread():
    """Small shapes on a shared 2-core machine: one thread avoids OpenMP oversubscription stalls (a 27 s test
    took 0.1 s). Restored afterwards so other test directories keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
