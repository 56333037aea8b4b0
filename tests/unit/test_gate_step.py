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
