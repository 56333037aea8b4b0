"""training/fused_step.py: where `loss.fused` applies, and the gate call it passes into the heads' forward."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mixdpo_ds.model.experts import PolicyOutput
from mixdpo_ds.training.batch import chosen_prompt_features
from mixdpo_ds.training.fused_step import GateCall, fused_unsupported, resolve_fused


def _cfg(fused="auto", kind="heads", ep_size=1, mode="exact", rpo_alpha=0.0, impl="chunked", head_rank=None):
    return SimpleNamespace(experts=SimpleNamespace(kind=kind, ep_size=ep_size, logprob_impl=impl, head_rank=head_rank),
                           em=SimpleNamespace(mode=mode), loss=SimpleNamespace(rpo_alpha=rpo_alpha, fused=fused))


UNTIED = SimpleNamespace(tied_head=False)


@pytest.mark.parametrize("change, reason", [
    ({"kind": "lora"}, "experts.kind='lora'"), ({"ep_size": 2}, "experts.ep_size=2"),
    ({"mode": "gumbel"}, "em.mode='gumbel'"), ({"rpo_alpha": 0.5}, "loss.rpo_alpha=0.5"),
    ({"impl": "naive"}, "experts.logprob_impl='naive'"), ({"impl": "triton"}, "experts.logprob_impl='triton'"),
])
def test_each_reason_is_named(change, reason):
    assert fused_unsupported(_cfg(), UNTIED, "cpu") is None
    assert reason in fused_unsupported(_cfg(**change), UNTIED, "cpu")
    assert "tied K = 1" in fused_unsupported(_cfg(), SimpleNamespace(tied_head=True), "cpu")
    assert "ranked data" in fused_unsupported(_cfg(), UNTIED, "cpu", ranked=True)


def test_auto_keeps_the_triton_kernel_on_cuda_but_not_for_low_rank_heads():
    assert "CUDA" in fused_unsupported(_cfg(impl="auto"), UNTIED, "cuda")
    assert fused_unsupported(_cfg(impl="auto", head_rank=8), UNTIED, "cuda") is None  # no Triton low-rank kernel
    assert fused_unsupported(_cfg(impl="auto"), UNTIED, "cpu") is None


def test_modes():
    assert resolve_fused(_cfg("auto"), UNTIED, "cpu") and not resolve_fused(_cfg("never"), UNTIED, "cpu")
    assert not resolve_fused(_cfg("auto", mode="gumbel"), UNTIED, "cpu")  # auto falls back
    with pytest.raises(ValueError, match=r"loss.fused='always' cannot apply: em.mode='gumbel'"):
        resolve_fused(_cfg("always", mode="gumbel"), UNTIED, "cpu")


def test_gate_call_reads_the_chosen_rows_and_keeps_log_w():
    seen = {}

    def gate(features):  # what the trainer passes: gate_forward on the forward's (2B, H) prompt features
        chosen = chosen_prompt_features(PolicyOutput(None, features), 2)
        seen.update(features=chosen)
        return torch.full((2, 2), -0.5)

    call = GateCall(gate)
    features = torch.arange(8.0).view(4, 2)  # (2B, H): chosen rows 0..1, rejected 2..3
    out = call(features)
    assert torch.equal(seen["features"], features[:2]) and call.log_w is out
    assert call(None) is call.log_w and seen["features"] is None  # a user-only gate reads no features
