"""Unit tests run tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP oversubscription
(a tiny-model step was measured 10-15x slower with two threads while other processes ran)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
