"""training/gate_step.py: which gate mode runs (decided once), and the gate optimizer's settings."""
import pytest

from mixdpo_ds.model.gating import GateConfig, build_gate
from mixdpo_ds.training.gate_step import GateStep, gate_mode


@pytest.mark.parametrize("kind, update, has_params, want", [
    ("mix", "joint", False, "closed_form"), ("mix", "frozen", False, "frozen"), ("moe", "joint", True, "joint"),
    ("moe", "alternate", True, "alternate"), ("moe", "frozen", True, "frozen"), ("moe", "joint", False, "frozen"),
])
def test_gate_mode(kind, update, has_params, want):
    assert gate_mode(kind, update, has_params) == want


def test_refresh_and_optimizer_settings():
    moe = build_gate(GateConfig(kind="moe", features="user"), num_experts=2, hidden_size=4, num_users=3)
    step = GateStep(moe, "moe", "alternate", refresh=False, lr=0.1, lr_lambda=lambda s: 1.0, world=1, eps=0.5,
                    hold_until=7)
    assert step.refresh and step.by_gradient and step.hold_until == 7
    assert step.optimizer.param_groups[0]["eps"] == 0.5 and step.optimizer.param_groups[0]["lr"] == 0.1
    mix = build_gate(GateConfig(kind="mix"), num_experts=2, hidden_size=4)
    closed = GateStep(mix, "mix", "joint", refresh=True, lr=0.1, lr_lambda=lambda s: 1.0, world=1)
    assert closed.mode == "closed_form" and closed.refresh and not closed.by_gradient and closed.optimizer is None


def _user_gate_step(rho: float, max_scale: float = 1.0, lr: float = 1.0):
    import torch

    torch.manual_seed(0)
    gate = build_gate(GateConfig(kind="moe", features="user", w_min=0.0), num_experts=2, hidden_size=4, num_users=4)
    step = GateStep(gate, "moe", "joint", refresh=False, lr=lr, lr_lambda=lambda s: 1.0, world=1,
                    trust_region=rho, trust_max_scale=max_scale)
    users = torch.tensor([0, 1, 2, 3])
    log_w = step.log_w(None, users, 4, grad=True)
    target = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    (-(target * log_w).sum(-1).mean()).backward()
    return step, users, log_w.detach()


def test_trust_region_keeps_the_gate_while_the_experts_agree():
    """Equal margins: q = w, no information, so even lr = 1 leaves every gate parameter exactly where it was."""
    import torch

    step, users, log_w = _user_gate_step(rho=0.5)
    before = {k: v.clone() for k, v in step.gate.state_dict().items()}
    out = step._trust_region_step(log_w, torch.full((4, 2), 0.7), None, users)
    assert float(out["gate/information"]) == 0.0 and float(out["gate/step_scale"]) == 0.0
    assert all(torch.equal(before[k], v) for k, v in step.gate.state_dict().items())


def test_trust_region_bounds_the_step_by_the_posterior():
    """Margins ±ln 3 give q = (0.75, 0.25) or (0.25, 0.75) from w = (½, ½): information = 0.130812 nats per pair
    (0.75 ln 1.5 + 0.25 ln 0.5); the lr = 1 step is shrunk until mean KL(w_new ‖ w) ≈ ρ² · 0.130812."""
    import math

    import torch

    step, users, log_w = _user_gate_step(rho=0.5)
    m = math.log(3.0)
    margins = torch.tensor([[m, -m], [m, -m], [-m, m], [-m, m]])
    out = step._trust_region_step(log_w, margins, None, users)
    assert float(out["gate/information"]) == pytest.approx(0.130812, abs=1e-5)
    assert 0 < float(out["gate/step_scale"]) < 1
    new = step.log_w(None, users, 4)
    kl = float((new.exp() * (new - log_w)).sum(-1).mean())
    assert kl == pytest.approx(0.25 * 0.130812, rel=0.1)


def test_trust_region_lengthens_a_short_step_up_to_its_cap():
    import math

    import torch

    m = math.log(3.0)
    margins = torch.tensor([[m, -m], [m, -m], [-m, m], [-m, m]])
    short, users, log_w = _user_gate_step(rho=0.5, max_scale=1.0, lr=1e-4)
    grown, _, _ = _user_gate_step(rho=0.5, max_scale=1e6, lr=1e-4)
    target = 0.25 * 0.130812  # ρ² · information

    def kl_moved(step) -> float:
        new = step.log_w(None, users, 4)
        return float((new.exp() * (new - log_w)).sum(-1).mean())

    assert float(short._trust_region_step(log_w, margins, None, users)["gate/step_scale"]) == 1.0
    assert kl_moved(short) < 0.01 * target  # the lr = 1e-4 step alone falls far short of the region
    scale = float(grown._trust_region_step(log_w, margins, None, users)["gate/step_scale"])
    assert scale > 10  # lengthened well past the optimizer's step (the cap, 1e6, is not what stopped it)
    assert scale < 1e6
    assert kl_moved(grown) == pytest.approx(target, rel=0.25)


def test_region_scale_solves_a_quadratic_kl_in_one_refinement():
    """KL(s) = 0.02 s² and limit 0.08: s = 1 → 1·sqrt(0.08 / 0.02) = 2 exactly (KL(2) = 0.08 = limit), then stays;
    the cap 1.5 stops it at 1.5; a KL that cannot come within 1.5 × the limit gives 0 (no step)."""
    import torch

    from mixdpo_ds.training.gate_step import region_scale

    def quad(s):
        return 0.02 * s ** 2

    limit = torch.tensor(0.08)
    assert float(region_scale(quad, limit, 10.0)) == pytest.approx(2.0, rel=1e-6)
    assert float(region_scale(quad, limit, 1.5)) == pytest.approx(1.5, rel=1e-6)
    assert float(region_scale(lambda s: 0.2 + 0 * s, limit, 10.0)) == 0.0  # KL 0.2 > 1.5 · 0.08 at every scale



def test_the_default_region_sets_the_step_whatever_the_learning_rate():
    """gate.trust_region's and gate.trust_max_scale's defaults (ρ = 0.1, 1000): the first AdamW step is lr · g/|g|,
    so lr = 1e-3 and lr = 0.3 point the same way, and the region lengthens the one and shortens the other to the
    same step, mean KL(w_new ‖ w) = ρ² · 0.130812 (the ±ln 3 margins of the test above)."""
    import math

    import torch

    cfg = GateConfig()
    m = math.log(3.0)
    margins = torch.tensor([[m, -m], [m, -m], [-m, m], [-m, m]])
    moved, scales = [], []
    for lr in (1e-3, 0.3):
        step, users, log_w = _user_gate_step(rho=cfg.trust_region, max_scale=cfg.trust_max_scale, lr=lr)
        out = step._trust_region_step(log_w, margins, None, users)
        assert float(out["gate/step_kl"]) == pytest.approx(0.01 * 0.130812, rel=0.05)
        moved.append(step.log_w(None, users, 4))
        scales.append(float(out["gate/step_scale"]))
    assert scales[0] > 1 > scales[1]  # measured 6.92 and 0.0231: 300 × apart, as the learning rates
    assert scales[0] * 1e-3 == pytest.approx(scales[1] * 0.3, rel=1e-3)
    assert float((moved[0] - log_w).abs().max()) > 0.05  # the step is not ~0 (measured 0.069)
    torch.testing.assert_close(moved[0], moved[1], atol=1e-6, rtol=0)  # measured 6e-8


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_trust_max_scale_must_be_positive(bad):
    with pytest.raises(ValueError, match=r"gate.trust_max_scale=.*must be > 0"):
        GateConfig(kind="moe", trust_max_scale=bad)
