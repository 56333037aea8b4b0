"""Tests of mixdpo_ds.core.em: the regularised E-step against Lemma 6, phases, τ schedule, configs, warm-up."""

import math

import pytest
import torch

from mixdpo_ds.core.em import EMConfig, Phase, PhaseSchedule, random_responsibilities, tau_at
from mixdpo_ds.core.gumbel import GumbelConfig
from mixdpo_ds.core.losses import EStepWeights, e_step

torch.set_num_threads(1)

# one pair, K = 3: ℓ_k = log σ_k (per-expert BT log-likelihood) and the prior w
ELL = torch.tensor([math.log(0.9), math.log(0.5), math.log(0.2)], dtype=torch.float64)
W = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)


def lemma6_objective(q, lam_w, lam_ent, lam_conf, lam_unif):
    """Lemma 6 integrand, written term by term from the paper:
    Σ q ℓ + λ_ent H(q) − λ_conf H(q) − λ_unif KL(q ‖ U) − λ_w KL(q ‖ w)   (q: (..., K), 0 log 0 = 0)."""
    K = q.shape[-1]
    qlogq = torch.special.xlogy(q, q).sum(-1)
    H = -qlogq
    kl_u = qlogq + math.log(K)
    kl_w = qlogq - (q * W.log()).sum(-1)
    return (q * ELL).sum(-1) + lam_ent * H - lam_conf * H - lam_unif * kl_u - lam_w * kl_w


def simplex_grid(n):
    """All q = (i, j, n − i − j)/n: a grid of spacing 1/n on the 2-simplex."""
    i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    keep = (i + j) <= n
    i, j = i[keep].double(), j[keep].double()
    return torch.stack([i, j, n - i - j], -1) / n


CASES = [  # (λ_w, λ_ent, λ_conf, λ_unif): α = λ_ent − λ_conf + λ_unif + λ_w
    (1.0, 0.0, 0.0, 0.0),  # α = 1: exact posterior
    (1.0, 0.5, 0.0, 0.5),  # α = 2: early phase, softened
    (1.0, 0.0, 0.5, 0.0),  # α = .5: middle phase, sharpened
    (1.5, 0.0, 0.5, 0.0),  # α = 1, prior weight 1.5: late phase
    (0.5, 0.8, 0.3, 0.2),  # α = 1.2: all four on
]


@pytest.mark.parametrize("lams", CASES)
def test_regularised_e_step_maximises_lemma6_objective(lams):
    """The closed form softmax((λ_w log w + ℓ)/α) must (a) beat or tie every point of a 1/400 simplex grid
    and lie within one grid step of the grid argmax, and (b) match a torch maximiser (LBFGS over softmax
    parameters) to 1e-6."""
    q = e_step(W.log().unsqueeze(0), ELL.unsqueeze(0), *lams)[0]
    grid = simplex_grid(400)
    values = lemma6_objective(grid, *lams)
    best = grid[values.argmax()]
    assert lemma6_objective(q, *lams) >= values.max() - 1e-12
    assert (q - best).abs().max() <= 1 / 400 + 1e-9

    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -lemma6_objective(torch.softmax(theta, -1), *lams)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(q, torch.softmax(theta, -1).detach(), atol=1e-6, rtol=0)


def test_paper_printed_alpha_is_not_the_maximiser():
    """Why e_step_temperature departs from the printed α = λ_conf − λ_ent + λ_unif + λ_w: for λ_ent = .5,
    λ_w = 1 the printed α = .5 gives a q whose Lemma-6 objective is lower than ours (α = 1.5)."""
    lams = (1.0, 0.5, 0.0, 0.0)
    ours = e_step(W.log().unsqueeze(0), ELL.unsqueeze(0), *lams)[0]
    printed = torch.softmax((W.log() + ELL) / 0.5, -1)
    assert lemma6_objective(ours, *lams) > lemma6_objective(printed, *lams) + 1e-3


def test_phase_schedule_picks_the_right_phase():
    """paper_default(β = .1): starts 0, .3, .7. progress .0 / .29 → early; .3 / .5 → middle; .7 / 1.0 (and 1.5,
    clamped) → late with β/2 = .05."""
    s = PhaseSchedule.paper_default(0.1)
    assert [s.at(p).start for p in (0.0, 0.29, 0.3, 0.5, 0.7, 1.0, 1.5, -1.0)] == [0, 0, 0.3, 0.3, 0.7, 0.7, 0.7, 0]
    early, middle, late = s.phases
    assert early.estep.alpha == 2.0 and early.lambda_global == 0.1 and early.beta == 0.1
    assert middle.estep.alpha == 0.5 and middle.lambda_ent == 0.0
    assert late.estep.alpha == 1.0 and late.lambda_w == 1.5 and late.beta == 0.05
    custom = PhaseSchedule([{"start": 0.0, "lambda_ent": 1.0}, {"start": 0.5, "lambda_conf": 0.5, "beta": 0.2}])
    assert custom.at(0.49).lambda_ent == 1.0 and custom.at(0.5).beta == 0.2
    with pytest.raises(ValueError, match="first must have start 0"):
        PhaseSchedule([Phase(start=0.2)])
    with pytest.raises(ValueError, match="strictly increasing"):
        PhaseSchedule([Phase(start=0.0), Phase(start=0.5), Phase(start=0.5)])
    with pytest.raises(ValueError, match="lambda_conf"):
        Phase(lambda_conf=2.0)  # α = 1 − 2 < 0


def test_tau_schedule():
    """τ_0 = 2, τ_min = .5, N = 4: τ(t) = 2·(1/4)^(t/4) → t = 0: 2, t = 2: 1, t = 4: .5, t = 10: .5; N = 0 → 2."""
    cfg = EMConfig(mode="gumbel", gumbel={"tau": 2.0}, tau_min=0.5, tau_anneal_steps=4)
    assert [tau_at(t, cfg) for t in (0, 2, 4, 10)] == pytest.approx([2.0, 1.0, 0.5, 0.5])
    assert tau_at(7, EMConfig(gumbel={"tau": 2.0})) == 2.0


def test_em_config_from_plain_dicts():
    cfg = EMConfig(**{
        "mode": "gumbel", "posterior_correction": 0, "estep": {"lambda_ent": 0.5},
        "gumbel": {"samples": 3, "tau": 1.5, "logits": "prior", "hard": True},
        "phases": [{"start": 0.0, "lambda_unif": 1.0}, {"start": 0.5, "lambda_conf": 0.5}],
    })
    assert isinstance(cfg.estep, EStepWeights) and cfg.estep.alpha == 1.5
    assert isinstance(cfg.gumbel, GumbelConfig) and cfg.gumbel.samples == 3 and cfg.gumbel.hard
    assert cfg.schedule(0.1).at(0.6).lambda_conf == 0.5
    assert cfg.schedule(0.1).at(0.6).beta is None  # keep the run's β
    assert EMConfig(phases="paper").schedule(0.2).at(0.9).beta == 0.1
    fixed = EMConfig(estep={"lambda_unif": 0.5}, lambda_global=0.3).schedule(0.1)
    assert len(fixed.phases) == 1 and fixed.at(0.9).lambda_unif == 0.5 and fixed.at(0.9).lambda_global == 0.3


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "foo"}, "em.mode must be one of ['exact', 'gumbel'], got 'foo'"),
    ({"gate_update": "x"}, "em.gate_update must be one of ['joint', 'alternate', 'frozen'], got 'x'"),
    ({"posterior_correction": 2}, "em.posterior_correction must be one of [0, 1], got 2"),
    ({"estep": {"lambda_conf": 1.0}}, "lambda_conf"),
    ({"gumbel": {"logits": "q"}}, "em.gumbel.logits must be one of ['posterior', 'prior']"),
    ({"tau_min": 2.0}, "em.tau_min must be in (0, em.gumbel.tau=1.0]"),
    ({"phases": "early"}, "em.phases must be a list of phases, 'paper' or null"),
    ({"phases": [{"start": 0.5}]}, "first must have start 0"),
    ({"phases": [{"start": 0.0, "lambda_foo": 1.0}]}, "lambda_foo"),
    ({"label_smoothing": 0.5}, "em.label_smoothing must be in [0, 0.5)"),
    ({"warmup_random_steps": -1}, "em.warmup_random_steps"),
    ({"dirichlet_alpha": 0.0}, "em.dirichlet_alpha"),
])
def test_em_config_errors_name_the_key(kwargs, message):
    with pytest.raises((ValueError, TypeError)) as err:
        EMConfig(**kwargs)
    assert message in str(err.value)


def test_random_responsibilities():
    """Rows on the simplex, reproducible per generator, global RNG untouched; α = 1 means E[q_k] = 1/K:
    the mean of 4000 rows is within 0.02 of 1/3 (sd of the mean ≈ sqrt(2/36/4000) = 0.0037)."""
    state = torch.get_rng_state()
    a = random_responsibilities(4000, 3, 1.0, torch.Generator().manual_seed(5))
    b = random_responsibilities(4000, 3, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a, b)
    assert a.shape == (4000, 3) and a.dtype == torch.float32 and (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(4000))
    assert (a.mean(0) - 1 / 3).abs().max() < 0.02
    # small α concentrates near the vertices
    assert random_responsibilities(2000, 3, 0.05, torch.Generator().manual_seed(6)).max(-1).values.mean() > 0.9
