"""Export (mixdpo_ds.training.export): each expert reloads with from_pretrained and gives the trainer's log-probs."""
import os

import pytest
import torch
from _experts_testlib import hf_sequence_logps, make_batch, policy_logps
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixdpo_ds.model.experts import ExpertsConfig, build_policy
from mixdpo_ds.model.gating import GateConfig, build_gate
from mixdpo_ds.training.export import export_experts, load_compact, load_expert, load_experts, load_export_gate


def _trained_like(policy):
    """Perturb the trainable weights as a few training steps would, so export cannot pass by reloading the base."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return policy


@pytest.mark.parametrize("kind, kw", [("heads", dict(trunk="trainable")), ("heads", dict(trunk="frozen")),
                                      ("models", dict()), ("lora", dict())])
def test_export_reload_gives_same_logps(tiny_gpt2_dir, tiny_tokenizer, tmp_path, kind, kw):
    policy = _trained_like(build_policy(tiny_gpt2_dir, ExpertsConfig(kind=kind, num_experts=2, init_noise=0.1,
                                                                     logprob_impl="naive", **kw)))
    gate = build_gate(GateConfig(kind="mix"), num_experts=2, hidden_size=32)
    gate.update(torch.tensor([[0.9, 0.1]]))
    batch = make_batch(3)
    expected = policy_logps(policy, batch).logps.detach()                        # (2B, K) inside the trainer
    out = str(tmp_path / "export")
    export_experts(policy, gate, out, tiny_tokenizer, compact=(kind == "heads"), user_vocab={"u": 0})
    assert not os.path.exists(f"{out}.tmp")
    for k in range(2):
        reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(out, f"expert_{k}"))
        torch.testing.assert_close(hf_sequence_logps(reloaded, batch), expected[:, k], atol=1e-5, rtol=0)
        assert len(AutoTokenizer.from_pretrained(os.path.join(out, f"expert_{k}"))) == len(tiny_tokenizer)
    torch.testing.assert_close(hf_sequence_logps(load_expert(out, 1), batch), expected[:, 1], atol=1e-5, rtol=0)
    all_experts = load_experts(out, logprob_impl="naive")
    torch.testing.assert_close(policy_logps(all_experts, batch).logps, expected, atol=1e-5, rtol=0)
    if kind == "heads":
        compact = load_compact(out, logprob_impl="naive")
        torch.testing.assert_close(policy_logps(compact, batch).logps, expected, atol=1e-5, rtol=0)
    loaded_gate, meta = load_export_gate(out)
    torch.testing.assert_close(loaded_gate(None, None, batch_size=1), gate(None, None, batch_size=1))
    assert meta["user_vocab"] == {"u": 0}


def test_export_replaces_an_old_export_and_compact_needs_heads(tiny_gpt2_dir, tiny_tokenizer, tmp_path):
    out = str(tmp_path / "export")
    three = build_policy(tiny_gpt2_dir, ExpertsConfig(num_experts=3))
    export_experts(three, None, out, tiny_tokenizer)
    two = build_policy(tiny_gpt2_dir, ExpertsConfig(num_experts=2))
    export_experts(two, None, out, tiny_tokenizer)
    assert sorted(os.listdir(out)) == ["README.md", "expert_0", "expert_1", "export.json"]  # nothing from the first
    assert load_export_gate(out) == (None, None)
    models = build_policy(tiny_gpt2_dir, ExpertsConfig(kind="models", num_experts=2))
    with pytest.raises(ValueError, match="compact"):
        export_experts(models, None, str(tmp_path / "e2"), tiny_tokenizer, compact=True)
    # refused before anything is written (under ZeRO-3 every rank must agree before the first collective)
    assert not os.path.exists(tmp_path / "e2.tmp") and not os.path.exists(tmp_path / "e2")
