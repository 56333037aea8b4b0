"""MixturePolicy (mixdpo_ds.model.experts): the three expert kinds, sequence log-probs, params, expert export."""
import math

import pytest
import torch
from _experts_testlib import hf_sequence_logps, make_batch, make_examples, policy_logps
from transformers import AutoModelForCausalLM

from mixdpo_ds.model.experts import ExpertsConfig, build_policy
from mixdpo_ds.model.hf_lm import sequence_logps
from mixdpo_ds.training.batch import collate

KINDS = ["heads", "models", "lora"]


def _policy(path, kind="heads", k=3, **kw):
    kw.setdefault("init_noise", 0.0)  # tests state their noise; the library default is 0.05 for K > 1
    return build_policy(path, ExpertsConfig(kind=kind, num_experts=k, logprob_impl="naive", **kw))


@pytest.mark.parametrize("bad, key", [
    (dict(kind="mlp"), "experts.kind"), (dict(trunk="half"), "experts.trunk"),
    (dict(logprob_impl="cuda"), "experts.logprob_impl"), (dict(num_experts=0), "experts.num_experts"),
    (dict(init_noise=-1.0), "experts.init_noise"), (dict(lr_experts=[1e-3, 2e-3, 3e-3]), "experts.lr_experts"),
    (dict(kind="models", init_paths=["a"]), "experts.init_paths"), (dict(init_paths=["a"] * 3), "experts.init_paths"),
    (dict(ep_size=2), "experts.ep_size"), (dict(kind="lora", lora_target_modules=["lm_head"]), "lora_target"),
])
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        ExpertsConfig(**bad)


def test_sequence_logps_hand_computed():
    """V=2, H=1; head 0 = [[0], [1]] gives logits [0, h]; head 1 = zeros gives p = (1/2, 1/2).

    Row 0: hidden [ln 3, 0, 5], labels [-100, 1, 0]: token 1 from h=ln 3: p = 3/(1+3) = 3/4; token 0 from h=0:
    p = 1/2 -> head 0: ln(3/4) + ln(1/2) = ln(3/8); head 1: 2 ln(1/2) = ln(1/4). The last position predicts
    nothing (shift). Row 1: labels [-100, -100, 1]: only hidden[1] = 0 -> ln(1/2) for both heads.
    """
    hidden = torch.tensor([[[math.log(3)], [0.0], [5.0]], [[7.0], [0.0], [9.0]]])     # (2, 3, 1)
    heads = torch.tensor([[[0.0], [1.0]], [[0.0], [0.0]]])                            # (2, 2, 1)
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 1]])
    for impl in ("naive", "chunked"):
        out = sequence_logps(hidden, heads, labels, impl)
        expected = torch.tensor([[math.log(3 / 8), math.log(1 / 4)], [math.log(1 / 2), math.log(1 / 2)]])
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_heads_are_untied_copies_and_noise(tiny_gpt2_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    base_head = base.get_output_embeddings().weight.detach()
    same = _policy(tiny_gpt2_dir, init_noise=0.0)
    for k in range(3):
        assert torch.equal(same.heads[k], base_head)
    with torch.no_grad():
        same.heads[0].add_(1.0)
    assert torch.equal(same.trunk.wte.weight, base_head)     # GPT-2 ties wte and head: the copies are untied
    noisy = _policy(tiny_gpt2_dir, init_noise=0.1)
    diffs = [(noisy.heads[k] - base_head).detach() for k in range(3)]
    assert not torch.equal(noisy.heads[0], noisy.heads[1]) and not torch.equal(noisy.heads[1], noisy.heads[2])
    for d in diffs:      # std relative to the base head's std
        assert abs(float(d.std()) / float(base_head.std()) - 0.1) < 0.01
    again = _policy(tiny_gpt2_dir, init_noise=0.1)
    assert torch.equal(noisy.heads, again.heads)            # seeded


@pytest.mark.parametrize("kind", ["models", "lora"])
def test_init_noise_models_and_lora(tiny_gpt2_dir, kind):
    batch = make_batch(2)
    lp0 = policy_logps(_policy(tiny_gpt2_dir, kind, k=2, init_noise=0.0), batch).logps
    torch.testing.assert_close(lp0[:, 0], lp0[:, 1], atol=0, rtol=0)     # identical experts at noise 0
    lp1 = policy_logps(_policy(tiny_gpt2_dir, kind, k=2, init_noise=0.1), batch).logps
    assert (lp1[:, 0] - lp1[:, 1]).abs().max() > 1e-4


def test_frozen_trunk_has_no_grad_trainable_does(tiny_gpt2_dir):
    batch = make_batch(2)
    frozen = _policy(tiny_gpt2_dir, trunk="frozen", init_noise=0.1)
    frozen.train()
    assert not frozen.trunk.training                         # frozen trunk stays in eval mode
    policy_logps(frozen, batch).logps.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in frozen.trunk.parameters())
    assert frozen.heads.grad is not None and frozen.heads.grad.abs().sum() > 0
    trainable = _policy(tiny_gpt2_dir, trunk="trainable", init_noise=0.1)
    policy_logps(trainable, batch).logps.sum().backward()
    assert all(p.grad is not None for p in trainable.trunk.parameters() if p.requires_grad)
    assert trainable.trunk.h[0].attn.c_attn.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_logps_equal_hand_sum_of_each_expert(tiny_gpt2_dir, kind):
    """logps[:, k] = Σ_response log_softmax(logits of expert_model(k))[next token], to 1e-5, for every kind."""
    policy = _policy(tiny_gpt2_dir, kind, k=2, init_noise=0.1)
    batch = make_batch(3)
    out = policy_logps(policy, batch)
    assert out.logps.shape == (6, 2) and out.logps.dtype == torch.float32
    for k in range(2):
        torch.testing.assert_close(out.logps[:, k], hf_sequence_logps(policy.expert_model(k), batch),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_every_trainable_param_gets_a_gradient(tiny_gpt2_dir, kind):
    """All K experts are trainable at once (peft's set_adapter would freeze the inactive adapters)."""
    policy = _policy(tiny_gpt2_dir, kind, k=2, init_noise=0.1, trunk="trainable")
    out = policy_logps(policy, make_batch(2))
    (out.logps * torch.tensor([1.0, -2.0])).sum().backward()
    trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_chunked_impl_matches_naive(tiny_gpt2_dir):
    batch = make_batch(3)
    naive = _policy(tiny_gpt2_dir, init_noise=0.1)
    chunked = build_policy(tiny_gpt2_dir, ExpertsConfig(num_experts=3, init_noise=0.1, logprob_impl="chunked",
                                                        chunk_size=4))
    torch.testing.assert_close(policy_logps(chunked, batch).logps, policy_logps(naive, batch).logps,
                               atol=1e-5, rtol=0)


def test_k1_heads_equals_plain_hf_model(tiny_gpt2_dir):
    batch = make_batch(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    for trunk in ("frozen", "trainable"):
        out = policy_logps(_policy(tiny_gpt2_dir, k=1, trunk=trunk).eval(), batch)
        torch.testing.assert_close(out.logps[:, 0], hf_sequence_logps(base, batch), atol=1e-5, rtol=0)


def test_padding_does_not_matter(tiny_gpt2_dir):
    """The same pair alone and beside a longer pair (so right-padded) gets the same log-probs."""
    policy = _policy(tiny_gpt2_dir, "models", k=1)
    short = make_examples(1, seed=1)[0]
    long = {**short, "prompt_ids": short["prompt_ids"] * 3, "chosen_ids": short["chosen_ids"] * 3, "index": 1}
    alone = policy_logps(policy, collate([short], 0)).logps            # rows: chosen, rejected
    padded = policy_logps(policy, collate([short, long], 0)).logps     # rows: c0, c1, r0, r1
    torch.testing.assert_close(padded[[0, 2]], alone, atol=1e-5, rtol=0)


def test_prompt_features_are_the_detached_last_prompt_hidden(tiny_gpt2_dir):
    policy = _policy(tiny_gpt2_dir, trunk="trainable")
    batch = make_batch(2)
    out = policy_logps(policy, batch)
    hidden = policy.trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    expected = hidden[torch.arange(4), batch["prompt_last_index"]]
    assert out.prompt_features.shape == (4, 32) and not out.prompt_features.requires_grad
    torch.testing.assert_close(out.prompt_features, expected.detach(), atol=1e-6, rtol=0)
    assert policy(batch["input_ids"], batch["attention_mask"], batch["labels"]).prompt_features is None


@pytest.mark.parametrize("kind, kw, names", [
    ("heads", dict(trunk="trainable", lr_trunk=1e-5, lr_experts=2e-3), {"trunk": 1e-5, "experts": 2e-3}),
    ("heads", dict(), {"experts": 1e-3}),
    ("models", dict(lr_experts=[1e-4, 2e-4, 3e-4]), {"expert_0": 1e-4, "expert_1": 2e-4, "expert_2": 3e-4}),
    ("lora", dict(lr_experts=[1e-4, 2e-4, 3e-4]), {"expert_0": 1e-4, "expert_1": 2e-4, "expert_2": 3e-4}),
])
def test_param_groups_cover_trainable_params_once(tiny_gpt2_dir, kind, kw, names):
    policy = _policy(tiny_gpt2_dir, kind, **kw)
    groups = policy.param_groups(lr=1e-3, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in policy.parameters() if p.requires_grad}
    for g in groups:
        base_name = g["name"].removesuffix("_no_decay")
        assert g["lr"] == names[base_name]
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.1)
    assert {g["name"].removesuffix("_no_decay") for g in groups} == set(names)
    if kind == "lora":      # each adapter's params sit only in its own group
        for g in groups:
            adapter = g["name"].removesuffix("_no_decay")
            names_in = [n for n, p in policy.named_parameters() if any(p is q for q in g["params"])]
            assert names_in and all(f".{adapter}." in n for n in names_in)


@pytest.mark.parametrize("kind", ["heads", "lora"])
def test_builtin_reference_is_the_base_model(tiny_gpt2_dir, kind):
    policy = _policy(tiny_gpt2_dir, kind, init_noise=0.2)
    assert policy.has_builtin_reference
    batch = make_batch(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ref = policy.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(ref, hf_sequence_logps(base, batch), atol=1e-5, rtol=0)
    assert not _policy(tiny_gpt2_dir, trunk="trainable").has_builtin_reference


def test_frozen_heads_forward_returns_the_reference_of_the_same_pass(tiny_gpt2_dir):
    """Frozen-trunk heads: the forward's `ref_logps` is the base model's sequence log-prob (no second trunk pass);
    a trainable trunk has no such shortcut (its hidden states are not the reference's)."""
    batch = make_batch(3)
    out = policy_logps(_policy(tiny_gpt2_dir, init_noise=0.2), batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    torch.testing.assert_close(out.ref_logps, hf_sequence_logps(base, batch), atol=1e-5, rtol=0)
    assert policy_logps(_policy(tiny_gpt2_dir, trunk="trainable"), batch).ref_logps is None


def test_default_init_noise_breaks_symmetry_only_when_k_above_one():
    """Default `init_noise=None` resolves to 0.05 for K > 1 (symmetry must be broken) and 0 for K = 1 (plain DPO)."""
    assert ExpertsConfig(num_experts=3).init_noise == 0.05
    assert ExpertsConfig(num_experts=1).init_noise == 0.0
    assert ExpertsConfig(num_experts=3, init_noise=0.0).init_noise == 0.0


def test_models_from_init_paths(tiny_gpt2_dir, tmp_path, tiny_tokenizer):
    from mixdpo_ds.apps.tiny import build_tiny_model

    other = build_tiny_model(str(tmp_path / "other"), tiny_tokenizer, seed=1)
    policy = _policy(tiny_gpt2_dir, "models", k=2, init_paths=[tiny_gpt2_dir, other])
    batch = make_batch(2)
    lp = policy_logps(policy, batch).logps
    torch.testing.assert_close(lp[:, 1], hf_sequence_logps(AutoModelForCausalLM.from_pretrained(other), batch),
                               atol=1e-5, rtol=0)


def test_bf16_policy_is_close_to_fp32(tiny_gpt2_dir):
    """bf16 weights, fp32 log-probs: within bf16 rounding of the fp32 policy (~1e-2 per token, ~10 tokens/row)."""
    batch = make_batch(2)
    fp32 = policy_logps(_policy(tiny_gpt2_dir, init_noise=0.1), batch).logps
    bf16_policy = build_policy(tiny_gpt2_dir, ExpertsConfig(num_experts=3, init_noise=0.1, logprob_impl="naive"),
                               torch_dtype=torch.bfloat16)
    assert bf16_policy.heads.dtype == torch.bfloat16
    out = policy_logps(bf16_policy, batch).logps
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fp32, atol=0.3, rtol=0)
    out.sum().backward()
    assert bf16_policy.heads.grad.dtype == torch.bfloat16


def test_lora_every_adapter_gets_gradients_after_the_builtin_reference(tiny_gpt2_dir):
    """The trainer's order: policy forward (K adapter passes) → built-in reference (adapters off) → backward. Every
    adapter's LoRA weights keep requires_grad and receive a gradient, and the reference really is the base model.
    (peft's set_adapter / disable_adapter left all but the last adapter requires_grad=False at the backward: only one
    expert learned, and ZeRO-1/2 crashed on the missing gradients.)"""
    policy = _policy(tiny_gpt2_dir, "lora", init_noise=0.2)
    batch = make_batch(3)
    out = policy_logps(policy, batch)
    ref = policy.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    torch.testing.assert_close(ref, hf_sequence_logps(base, batch), atol=1e-5, rtol=0)
    (out.logps - ref[:, None]).sum().backward()
    lora = {n: p for n, p in policy.named_parameters() if "lora_" in n}
    for k in range(3):
        mine = {n: p for n, p in lora.items() if f".expert_{k}." in n}
        assert mine and all(p.requires_grad for p in mine.values()), k
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mine.values()), k
    # each pass used only its own adapter: expert 0's logps do not depend on expert 1's weights
    assert not torch.allclose(out.logps[:, 0], out.logps[:, 1])
