"""Gates (mixdpo_ds.model.gating): shapes, the Mix-DPO closed-form update, user features, pre-training, save/load."""
import math

import pytest
import torch

from mixdpo_ds.model.gating import GateConfig, MixGate, MoEGate, build_gate, load_gate, pretrain_gate, save_gate


@pytest.mark.parametrize("bad, key", [
    (dict(kind="dense"), "gate.kind"), (dict(arch="cnn"), "gate.arch"), (dict(features="time"), "gate.features"),
    (dict(init="zeros"), "gate.init"), (dict(rho=0.0), "gate.rho"), (dict(rho=1.5), "gate.rho"),
    (dict(w_min=-0.1), "gate.w_min"), (dict(pretrain_steps=5), "gate.pretrain_label_column"),
])
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        GateConfig(**bad)


def test_w_min_must_be_below_one_over_k():
    with pytest.raises(ValueError, match="gate.w_min"):
        MixGate(GateConfig(w_min=0.4), num_experts=3)


def test_mix_gate_uniform_broadcast():
    gate = build_gate(GateConfig(kind="mix"), num_experts=3, hidden_size=8)
    log_w = gate(torch.zeros(5, 8), None)
    assert log_w.shape == (5, 3)
    torch.testing.assert_close(log_w, torch.full((5, 3), -math.log(3)))
    assert gate(None, None, batch_size=2).shape == (2, 3)
    assert not any(True for _ in gate.parameters())      # no gradient: closed-form update only


def test_mix_gate_random_init_is_a_seeded_distribution():
    a = MixGate(GateConfig(init="random"), 4, seed=1)
    b = MixGate(GateConfig(init="random"), 4, seed=1)
    assert torch.equal(a.log_w, b.log_w)
    assert abs(float(a.log_w.exp().sum()) - 1) < 1e-6 and a.log_w.exp().std() > 0


def test_mix_gate_update_hand_computed():
    """w = (1/3, 1/3, 1/3), resp rows (1, 0, 0) and (1/2, 1/2, 0): mean_i q_i = (3/4, 1/4, 0).

    ρ = 1, w_min = 0.01: (3/4, 1/4, 0) -> the 0 is floored to 0.01, the rest rescaled to fill 0.99:
    (0.75 · 0.99, 0.25 · 0.99, 0.01) = (0.7425, 0.2475, 0.01).
    Then ρ = 1/2 from there: ½ (0.7425, 0.2475, 0.01) + ½ (3/4, 1/4, 0) = (0.74625, 0.24875, 0.005) -> floor the
    0.005: (0.74625, 0.24875) · 0.99 / 0.995 = (0.7425, 0.2475), w = (0.7425, 0.2475, 0.01) again.
    """
    resp = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    gate = MixGate(GateConfig(kind="mix", rho=1.0, w_min=0.01), 3)
    w = gate.update(resp)
    torch.testing.assert_close(w, torch.tensor([0.7425, 0.2475, 0.01]), atol=1e-6, rtol=0)
    torch.testing.assert_close(gate(None, None, batch_size=1)[0].exp(), w, atol=1e-6, rtol=0)
    gate.cfg.rho = 0.5
    torch.testing.assert_close(gate.update(resp), torch.tensor([0.7425, 0.2475, 0.01]), atol=1e-6, rtol=0)


def test_mix_gate_running_average_hand_computed():
    """ρ = 1/2, w = (1/2, 1/2), mean q = (1, 0): ½ (1/2, 1/2) + ½ (1, 0) = (3/4, 1/4) (no floor hit, w_min = 0)."""
    gate = MixGate(GateConfig(kind="mix", rho=0.5, w_min=0.0), 2)
    torch.testing.assert_close(gate.update(torch.tensor([[1.0, 0.0]])), torch.tensor([0.75, 0.25]))


@pytest.mark.parametrize("arch", ["linear", "mlp"])
@pytest.mark.parametrize("features", ["prompt", "user", "prompt+user"])
def test_moe_gate_shapes_uniform_init_and_grad(arch, features):
    cfg = GateConfig(kind="moe", arch=arch, features=features, user_dim=4, mlp_hidden=8)
    gate = build_gate(cfg, num_experts=3, hidden_size=8, num_users=5)
    x, users = torch.randn(6, 8), torch.tensor([0, 1, 4, -1, 2, 3])
    log_w = gate(x, users)
    assert log_w.shape == (6, 3) and log_w.dtype == torch.float32
    torch.testing.assert_close(log_w, torch.full((6, 3), -math.log(3)))     # uniform init: zero last layer
    (log_w[:, 0].sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())


def test_moe_gate_users_route_and_check_range():
    cfg = GateConfig(kind="moe", features="user", init="random", user_dim=4)
    gate = build_gate(cfg, num_experts=2, hidden_size=8, num_users=3, seed=0)
    log_w = gate(None, torch.tensor([0, 1, -1]))
    assert not torch.allclose(log_w[0], log_w[1])                     # different users, different weights
    torch.testing.assert_close(gate(None, torch.tensor([-1]))[0], log_w[2])
    with pytest.raises(ValueError, match="user id out of range"):
        gate(None, torch.tensor([3]))
    with pytest.raises(ValueError, match="num_users"):
        build_gate(GateConfig(kind="moe", features="user"), num_experts=2, hidden_size=8, num_users=None)


def test_pretrain_reaches_high_accuracy_on_separable_toy():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=g)
    centers = torch.randn(3, 16, generator=g) * 3
    features = centers[labels] + torch.randn(300, 16, generator=g)
    gate = build_gate(GateConfig(kind="moe", arch="linear"), num_experts=3, hidden_size=16)
    assert pretrain_gate(gate, features, labels, steps=60, lr=0.1) > 0.97
    mlp = build_gate(GateConfig(kind="moe", arch="mlp", mlp_hidden=16), num_experts=3, hidden_size=16)
    assert pretrain_gate(mlp, features, labels, steps=80, lr=0.05, batch_size=64) > 0.97
    users = torch.arange(300) % 4
    ugate = build_gate(GateConfig(kind="moe", features="user"), num_experts=2, hidden_size=16, num_users=4)
    assert pretrain_gate(ugate, None, users % 2, steps=40, lr=0.2, user_ids=users) == 1.0


def test_pretrain_mix_gate_sets_label_frequencies():
    """labels (0, 0, 0, 1): frequencies (3/4, 1/4, 0) -> the 0 floored at w_min = 0.01, the rest scaled to 0.99:
    (0.7425, 0.2475, 0.01); argmax is expert 0, right on 3 of 4 labels."""
    gate = MixGate(GateConfig(kind="mix", w_min=0.01), 3)
    acc = pretrain_gate(gate, None, torch.tensor([0, 0, 0, 1]), steps=1, lr=0.1)
    assert acc == 0.75
    torch.testing.assert_close(gate.log_w.exp(), torch.tensor([0.7425, 0.2475, 0.01]))


@pytest.mark.parametrize("cfg", [GateConfig(kind="mix", rho=0.5),
                                 GateConfig(kind="moe", arch="mlp", features="prompt+user", init="random",
                                            user_dim=4, mlp_hidden=8)])
def test_save_load_round_trip(tmp_path, cfg):
    gate = build_gate(cfg, num_experts=3, hidden_size=8, num_users=4, seed=3)
    if isinstance(gate, MixGate):
        gate.update(torch.tensor([[0.2, 0.3, 0.5]]))
    vocab = {"alice": 0, "bob": 1, "carol": 2, "dan": 3}
    save_gate(gate, cfg, str(tmp_path / "gate"), user_vocab=vocab)
    loaded, meta = load_gate(str(tmp_path / "gate"), with_meta=True)
    assert type(loaded) is type(gate) and meta["user_vocab"] == vocab and meta["num_experts"] == 3
    x, users = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, -1])
    torch.testing.assert_close(loaded(x, users), gate(x, users), atol=0, rtol=0)
    assert loaded.cfg == cfg
    if isinstance(loaded, MoEGate):
        assert loaded.num_users == 4 and loaded.hidden_size == 8


def test_moe_gate_floor_by_hand():
    """w_min = 0.1, K = 2, logits (0, ln 3): softmax (0.25, 0.75) -> w = 0.1 + 0.8·(0.25, 0.75) = (0.3, 0.7);
    logits (0, 100): softmax ≈ (0, 1) -> (0.1, 0.9): no weight below the floor."""
    import math

    gate = build_gate(GateConfig(kind="moe", features="user", user_dim=1, w_min=0.1), num_experts=2, hidden_size=4,
                      num_users=2)
    with torch.no_grad():
        gate.user_embedding.weight.copy_(torch.tensor([[1.0], [2.0], [0.0]]))
        gate.net.weight.copy_(torch.tensor([[0.0], [math.log(3)]]))
        gate.net.bias.zero_()
    w = gate(None, torch.tensor([0])).exp()
    torch.testing.assert_close(w, torch.tensor([[0.3, 0.7]]))
    with torch.no_grad():
        gate.net.weight.copy_(torch.tensor([[0.0], [50.0]]))
    torch.testing.assert_close(gate(None, torch.tensor([1])).exp(), torch.tensor([[0.1, 0.9]]))
    with pytest.raises(ValueError, match="gate.w_min=0.5: must be < 1/K"):
        build_gate(GateConfig(kind="moe", features="user", w_min=0.5), num_experts=2, hidden_size=4, num_users=2)


def test_population_prior_by_hand():
    """Two users, K = 2, w_min = 0: user 0 logits (0, 0) → w = (½, ½); user 1 logits (0, ln 3) → (¼, ¾); the prior
    of a new user is their mean (⅜, ⅝), whatever the shared no-user row says (logits (0, 2) here)."""
    gate = build_gate(GateConfig(kind="moe", features="user", user_dim=1, w_min=0.0), num_experts=2, hidden_size=4,
                      num_users=2)
    with torch.no_grad():
        gate.user_embedding.weight.copy_(torch.tensor([[0.0], [1.0], [2.0 / math.log(3)]]))
        gate.net.weight.copy_(torch.tensor([[0.0], [math.log(3)]]))
        gate.net.bias.zero_()
    torch.testing.assert_close(gate.population_log_w(None, batch_size=3).exp(), torch.tensor([[0.375, 0.625]] * 3))
    torch.testing.assert_close(gate(None, torch.tensor([-1])).exp(), torch.softmax(torch.tensor([[0.0, 2.0]]), -1))
    assert gate.has_population_prior
    prompt_gate = build_gate(GateConfig(kind="moe", features="prompt"), 2, 4)
    assert not prompt_gate.has_population_prior
    with pytest.raises(ValueError, match="needs a gate on user ids"):
        prompt_gate.population_log_w(torch.zeros(1, 4), 1)


def test_population_prior_with_prompt_features_is_the_mean_over_users_per_prompt():
    gate = build_gate(GateConfig(kind="moe", features="prompt+user", init="random", user_dim=3), num_experts=3,
                      hidden_size=5, num_users=7, seed=1)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.stack([gate(x, torch.full((4,), u), batch_size=4).exp() for u in range(7)]).mean(0)
    for chunk in (1, 3, 256):  # users per forward: the result does not depend on it
        torch.testing.assert_close(gate.population_log_w(x, 4, chunk=chunk).exp(), expected)
