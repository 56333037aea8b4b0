"""Low-rank expert heads (`experts.head_rank`, model/lowrank_heads.py) and the tied K = 1 head, in MixturePolicy:
log-probs against the exported experts' plain HF forward, zero deltas = the base head, gradients, optimizer groups,
export round trip."""
import pytest
import torch
from _experts_testlib import hf_sequence_logps, make_batch, policy_logps
from transformers import AutoModelForCausalLM

from mixdpo_ds.model.experts import ExpertsConfig, build_policy
from mixdpo_ds.training.export import export_experts, load_compact, load_experts


def _policy(path, k=3, rank=4, **kw):
    kw.setdefault("init_noise", 0.1)
    kw.setdefault("logprob_impl", "chunked")
    return build_policy(path, ExpertsConfig(kind="heads", num_experts=k, head_rank=rank, **kw))


@pytest.mark.parametrize("bad", [dict(head_rank=0), dict(head_rank=4, kind="models"),
                                 dict(head_rank=4, logprob_impl="triton"), dict(head_rank=4, ep_size=3)])
def test_config_errors_name_the_key(bad):
    with pytest.raises(ValueError, match="experts.head_rank"):
        ExpertsConfig(num_experts=3, **bad)


def test_rank_above_hidden_size_is_refused(tiny_gpt2_dir):
    with pytest.raises(ValueError, match=r"experts.head_rank=33: must be in \[1, hidden size 32\]"):
        _policy(tiny_gpt2_dir, rank=33)


@pytest.mark.parametrize("trunk", ["frozen", "trainable"])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_logps_equal_each_exported_expert(tiny_gpt2_dir, trunk, impl):
    """logps[:, k] = Σ_response log_softmax of expert_model(k) (trunk + W + A_k B_k as a plain HF model)."""
    policy = _policy(tiny_gpt2_dir, trunk=trunk, logprob_impl=impl).eval()
    batch = make_batch(3)
    out = policy_logps(policy, batch)
    assert out.logps.shape == (6, 3) and out.logps.dtype == torch.float32
    for k in range(3):
        torch.testing.assert_close(out.logps[:, k], hf_sequence_logps(policy.expert_model(k), batch), atol=1e-5,
                                   rtol=0)
    assert (out.logps[:, 0] - out.logps[:, 1]).abs().max() > 1e-3  # the noise made the experts differ


def test_zero_deltas_equal_the_base_head_and_give_the_reference(tiny_gpt2_dir):
    """init_noise = 0: A_k = 0, so all K experts are the base model; the frozen trunk's reference (base column of
    the same kernel pass) is the base model too."""
    batch = make_batch(3)
    base = hf_sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval(), batch)
    for trunk in ("frozen", "trainable"):
        out = policy_logps(_policy(tiny_gpt2_dir, trunk=trunk, init_noise=0.0).eval(), batch)
        for k in range(3):
            torch.testing.assert_close(out.logps[:, k], base, atol=1e-5, rtol=0)
    out = policy_logps(_policy(tiny_gpt2_dir, init_noise=0.3), batch)
    torch.testing.assert_close(out.ref_logps, base, atol=1e-5, rtol=0)
    assert not out.ref_logps.requires_grad


def test_init_noise_matches_the_full_heads_logit_noise(tiny_gpt2_dir):
    """A_k B_k has (about) the std of the full heads' noise, init_noise · std(W), per weight entry."""
    policy = _policy(tiny_gpt2_dir, k=4, rank=8, init_noise=0.2)
    delta = torch.stack([policy.expert_head(k) for k in range(4)]) - policy.ref_head       # (K, V, H)
    ratio = float(delta.std() / policy.ref_head.std())
    assert 0.17 < ratio < 0.23, ratio


def test_gradients_frozen_and_trainable(tiny_gpt2_dir):
    """Frozen trunk: only up / down train (W is the frozen reference). Trainable trunk on the tied tiny GPT-2: W is
    the input embedding itself (no copy), and every trainable parameter gets a gradient."""
    batch = make_batch(2)
    frozen = _policy(tiny_gpt2_dir)
    trainable_names = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable_names == {"lowrank_heads.up", "lowrank_heads.down"}
    (policy_logps(frozen, batch).logps * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in frozen.lowrank_heads.parameters())
    trainable = _policy(tiny_gpt2_dir, trunk="trainable")
    assert trainable.base_head is None and trainable.ref_head is None
    (policy_logps(trainable, batch).logps * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    for name, p in trainable.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    groups = trainable.param_groups(lr=1e-3, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted({id(p) for p in trainable.parameters() if p.requires_grad})
    assert {g["name"] for g in groups} == {"trunk", "trunk_no_decay", "experts"}


def test_export_round_trip(tiny_gpt2_dir, tmp_path, tiny_tokenizer):
    """Standalone HF experts (W + A_k B_k merged) and the compact export reload to the policy's log-probs."""
    policy = _policy(tiny_gpt2_dir, init_noise=0.2).eval()
    batch = make_batch(3)
    expected = policy_logps(policy, batch).logps
    out = export_experts(policy, None, str(tmp_path / "export"), tiny_tokenizer, compact=True)
    for reloaded in (load_experts(out, logprob_impl="naive"), load_compact(out, logprob_impl="naive")):
        torch.testing.assert_close(policy_logps(reloaded, batch).logps, expected, atol=1e-5, rtol=0)


def test_k1_tied_head_stays_tied_with_a_trainable_trunk(tiny_gpt2_dir, tmp_path, tiny_tokenizer):
    """K = 1, trainable trunk, tied GPT-2: the policy is the model itself (TRL's DPO): no head copy, the trainable
    parameters are exactly the base model's, the log-probs are the base's, and the export reloads to them."""
    policy = build_policy(tiny_gpt2_dir, ExpertsConfig(num_experts=1, trunk="trainable", logprob_impl="naive"))
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    assert policy.tied_head and policy.heads is None
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in base.parameters())        # parameters() counts a tied weight once
    batch = make_batch(3)
    out = policy_logps(policy.eval(), batch)
    torch.testing.assert_close(out.logps[:, 0], hf_sequence_logps(base, batch), atol=1e-5, rtol=0)
    out.logps.sum().backward()
    assert policy.trunk.wte.weight.grad.abs().sum() > 0
    assert [g["name"] for g in policy.param_groups(1e-3, 0.0)] == ["trunk", "trunk_no_decay"]
    reloaded = load_experts(export_experts(policy, None, str(tmp_path / "e"), tiny_tokenizer), logprob_impl="naive")
    torch.testing.assert_close(policy_logps(reloaded, batch).logps, out.logps.detach(), atol=1e-5, rtol=0)
    untied = build_policy(tiny_gpt2_dir, ExpertsConfig(num_experts=1, trunk="trainable", init_noise=0.1))
    assert not untied.tied_head and untied.heads is not None        # noise on the head needs its own copy
