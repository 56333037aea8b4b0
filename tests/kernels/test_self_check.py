"""The one-time Triton self-check that guards `auto` on a GPU (kernels/__init__.py): it passes when the kernels
agree with PyTorch (here under TRITON_INTERPRET=1), fails with a warning naming the difference when they do not,
and `auto` falls back to the PyTorch paths then."""
import mixdpo_ds.kernels as kernels
import pytest
import torch

pytestmark = pytest.mark.kernels


def test_self_check_passes_when_the_kernels_agree(monkeypatch):
    monkeypatch.setattr(kernels, "_SELF_CHECKED", {})
    assert kernels.triton_self_check("cpu") is True


def test_self_check_fails_and_auto_falls_back_when_a_kernel_is_wrong(monkeypatch):
    monkeypatch.setattr(kernels, "_SELF_CHECKED", {})
    module = kernels.triton_module("expert_logprobs")
    real = module.expert_logprobs_triton
    monkeypatch.setattr(module, "expert_logprobs_triton", lambda *a, **k: real(*a, **k) * 1.01)
    with pytest.warns(RuntimeWarning, match=r"failed their self-check on cpu \(logps: max \|triton - pytorch\|"):
        assert kernels.triton_self_check("cpu") is False
    assert kernels.triton_self_check("cpu") is False  # cached: checked once per device


def test_auto_uses_the_check_on_cuda_devices(monkeypatch):
    verdict = {}
    monkeypatch.setattr(kernels, "triton_self_check", lambda device: verdict["ok"])
    verdict["ok"] = True
    assert kernels.default_impl(torch.device("cuda")) == "triton"
    verdict["ok"] = False
    assert kernels.default_impl(torch.device("cuda")) == "chunked"
    assert kernels.default_impl("cuda", fallback="naive") == "naive"
    assert kernels.default_impl("cpu") == "chunked"  # never Triton on the CPU (tests run it explicitly)
