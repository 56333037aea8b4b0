"""The trainer with the Triton kernels (`experts.logprob_impl=triton`, `loss.impl=triton`; under
TRITON_INTERPRET=1 on the CPU) gives the same first-step loss and gradients as the naive PyTorch paths on a tiny
model: K = 3 heads, Mix-DPO and a MoE gate, same seed and batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixdpo_ds.training.batch import as_pairs
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.trainer import MixDPOTrainer

from .conftest import base_overrides

pytestmark = [pytest.mark.integration, pytest.mark.kernels]
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def first_step(model_dir: str, data: str, out: Path, impl: str, gate: str):
    cfg = load_config(CONFIG, base_overrides(model_dir, data, out, **{
        "experts.kind": "heads", "experts.num_experts": 3, "experts.init_noise": 0.3, "experts.trunk": "trainable",
        "experts.logprob_impl": impl, "loss.impl": impl, "gate.kind": gate, "train.max_steps": 1,
        "train.micro_batch_size": 2, "train.reference": "model", "train.export": False}))
    trainer = MixDPOTrainer(cfg)
    trainer.setup()
    try:
        batch = trainer.next_batch()
        out = trainer.policy_forward(batch)
        log_w = trainer.gate_forward(out, batch, grad=True)  # policy and gate gradients in one backward
        res = trainer.batch_loss(as_pairs(out.logps, batch["index"].shape[0]), trainer.ref_logps(batch, out), log_w)
        trainer.engine.backward(res.loss)
        gate = [("gate." + n, p) for n, p in trainer.gate.named_parameters()]
        named = [*trainer.engine.module.named_parameters(), *gate]
        grads = {n: p.grad.detach().clone() for n, p in named if p.grad is not None}
        return res.loss.detach(), res.resp, grads
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("gate", ["mix", "moe"])
def test_triton_first_step_equals_naive(tiny_gpt2_dir, prefs_jsonl, tmp_path, monkeypatch, gate):
    """On a CPU machine tests/conftest.py has set TRITON_INTERPRET=1, so the Triton kernels run interpreted."""
    import mixdpo_ds.kernels as kernels

    calls = []
    real = kernels.triton_module
    monkeypatch.setattr(kernels, "triton_module", lambda name: calls.append(name) or real(name))
    loss_n, resp_n, grads_n = first_step(tiny_gpt2_dir, prefs_jsonl, tmp_path / "naive", "naive", gate)
    assert not calls
    loss_t, resp_t, grads_t = first_step(tiny_gpt2_dir, prefs_jsonl, tmp_path / "triton", "triton", gate)
    assert {"expert_logprobs", "mbt_loss"} <= set(calls)  # the Triton kernels really ran
    torch.testing.assert_close(loss_t, loss_n, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(resp_t, resp_n, atol=1e-6, rtol=1e-6)
    assert grads_n.keys() == grads_t.keys() and any(k.endswith("heads") for k in grads_n)
    assert len(grads_n) > 1  # heads and trunk both receive gradients through the kernel
    assert (gate == "moe") == any(k.startswith("gate.") for k in grads_n)  # the MoE gate through the fused loss
    for name, g in grads_n.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_t[name], g, atol=1e-5, rtol=1e-4, msg=name)
