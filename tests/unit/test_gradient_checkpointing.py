"""train.gradient_checkpointing: the 'auto' default per experts kind, and checkpointed runs that equal plain ones.

training/build.py `checkpointing_wanted`, `checkpointing_kwargs`, `enable_gradient_checkpointing`. Checkpointing
recomputes the same forward in the backward, so log-probs and gradients equal the run without it (fp32, 1e-6); with
lora every adapter gets its own gradients (the recompute switches back to the adapter of its pass).
"""
import pytest
import torch

from mixdpo_ds.model.experts import ExpertsConfig, build_policy
from mixdpo_ds.training.build import checkpointing_kwargs, checkpointing_wanted, enable_gradient_checkpointing
from mixdpo_ds.training.config import TrainConfig, load_config

IDS = torch.tensor([[5, 9, 11, 3, 7, 2], [4, 8, 2, 6, 10, 12]])


def _batch():
    labels = IDS.clone()
    labels[:, :2] = -100
    return IDS, torch.ones_like(IDS), labels


@pytest.mark.parametrize(("kind", "trunk", "want"), [("heads", "frozen", False), ("heads", "trainable", True),
                                                     ("models", "frozen", True), ("lora", "frozen", True)])
def test_auto_is_on_where_a_transformer_trains(kind, trunk, want):
    experts = ExpertsConfig(kind=kind, trunk=trunk)
    assert checkpointing_wanted("auto", experts) is want and checkpointing_wanted(None, experts) is want
    assert checkpointing_wanted(True, experts) is True and checkpointing_wanted(False, experts) is False


def test_default_is_auto_and_bad_values_name_the_key():
    assert TrainConfig().gradient_checkpointing == "auto"
    cfg = load_config(None, ["model_name_or_path=/m", "gradient_checkpointing=false"])  # TRL's flat name
    assert cfg.train.gradient_checkpointing is False
    with pytest.raises(ValueError, match="train.gradient_checkpointing='yes'.*'auto'"):
        TrainConfig(gradient_checkpointing="yes")


def test_non_reentrant_and_lora_restores_its_adapter(tiny_gpt2_dir):
    heads = build_policy(tiny_gpt2_dir, ExpertsConfig(kind="heads", trunk="trainable"), seed=0)
    assert checkpointing_kwargs(heads) == {"use_reentrant": False}
    lora = build_policy(tiny_gpt2_dir, ExpertsConfig(kind="lora", num_experts=2, lora_r=4), seed=0)
    kwargs = checkpointing_kwargs(lora)
    assert kwargs["use_reentrant"] is False
    lora._select(0)
    _, recompute = kwargs["context_fn"]()          # captured at the forward of expert 0's pass
    lora._select(1)                                # ... the backward runs after expert 1's pass
    with recompute:
        assert {tuple(m.active_adapters) for m in lora._lora_layers} == {("expert_0",)}
    assert {tuple(m.active_adapters) for m in lora._lora_layers} == {("expert_1",)}


def _logps_and_grads(policy):
    logps = policy(*_batch()).logps                                             # (2, K)
    logps.sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def _checkpointed(models) -> bool:
    return bool(models) and all(m.is_activation_checkpointing if hasattr(m, "is_activation_checkpointing")
                                else m.is_gradient_checkpointing for m in models)


def test_trainable_trunk_checkpointing_keeps_logps_and_gradients(tiny_gpt2_dir):
    cfg = ExpertsConfig(kind="heads", trunk="trainable", num_experts=2, init_noise=0.05)
    plain = build_policy(tiny_gpt2_dir, cfg, seed=0).train()
    ckpt = build_policy(tiny_gpt2_dir, cfg, seed=0).train()
    models = enable_gradient_checkpointing(ckpt)
    assert models == [ckpt.trunk] and _checkpointed(models)
    (want, want_grads), (got, got_grads) = _logps_and_grads(plain), _logps_and_grads(ckpt)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and any(n.startswith("trunk.") for n in got_grads)
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-6, atol=1e-6, msg=n)


def test_lora_checkpointing_trains_the_adapters(tiny_gpt2_dir):
    """The K adapters share the base: the backward's recompute must use each pass's own adapter (`context_fn` in
    `checkpointing_kwargs`; without it the gradients differ by ~1, the size of the gradients themselves)."""
    cfg = ExpertsConfig(kind="lora", num_experts=2, lora_r=4, init_noise=0.5)
    plain = build_policy(tiny_gpt2_dir, cfg, seed=0).train()
    ckpt = build_policy(tiny_gpt2_dir, cfg, seed=0).train()
    assert _checkpointed(enable_gradient_checkpointing(ckpt))
    (want, want_grads), (first, grads) = _logps_and_grads(plain), _logps_and_grads(ckpt)
    torch.testing.assert_close(first, want, rtol=0, atol=1e-6)
    adapters = {n for n, p in ckpt.named_parameters() if p.requires_grad}
    assert adapters and grads.keys() == want_grads.keys() == adapters     # every adapter, no frozen base weight
    for k in range(2):
        assert any(f".expert_{k}." in n and grads[n].abs().sum() > 0 for n in grads), k
    for n in want_grads:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-6, atol=1e-6, msg=n)
    opt = torch.optim.SGD([p for p in ckpt.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    opt.zero_grad()
    after, _ = _logps_and_grads(ckpt)
    assert (after - first).abs().max() > 1e-4                              # the step moved the log-probs
