"""Few-shot posterior, temperature fit and ECE (mixdpo_ds/core/personalize.py, docs/math.md §13), hand-computed."""
from __future__ import annotations

import math

import pytest
import torch

from mixdpo_ds.core.personalize import (
    decision_accuracy,
    expected_calibration_error,
    fit_temperature,
    mixture_nll,
    mixture_probability,
    user_mixture_nll,
    user_posterior,
)

S1, S2, S0, SM1 = 0.7310585786300049, 0.8807970779778823, 0.5, 0.2689414213699951  # σ(1), σ(2), σ(0), σ(−1)


def test_posterior_two_experts_three_pairs_by_hand():
    """w = (0.6, 0.4); margins of the 3 pairs (expert 0, expert 1): (1, −1), (2, 0), (0, 1).
    expert 0: 0.6 · σ(1) σ(2) σ(0) = 0.6 · 0.73106 · 0.88080 · 0.5 = 0.193174
    expert 1: 0.4 · σ(−1) σ(0) σ(1) = 0.4 · 0.26894 · 0.5 · 0.73106 = 0.039322
    q = (0.193174, 0.039322) / 0.232497 = (0.830869, 0.169131)."""
    a0, a1 = 0.6 * S1 * S2 * S0, 0.4 * SM1 * S0 * S1
    assert a0 == pytest.approx(0.193174, abs=1e-6) and a1 == pytest.approx(0.039322, abs=1e-6)
    q = user_posterior(torch.tensor([0.6, 0.4]).log(), torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 1.0]]))
    assert q.tolist() == pytest.approx([0.830869, 0.169131], abs=1e-6)


def test_posterior_with_temperature_by_hand():
    """Same pairs, T = 2: margins halve. expert 0: 0.6 σ(0.5) σ(1) σ(0) = 0.6·0.62246·0.73106·0.5 = 0.136516;
    expert 1: 0.4 σ(−0.5) σ(0) σ(0.5) = 0.4·0.37754·0.5·0.62246 = 0.047001 → q = (0.743889, 0.256111): a hotter
    temperature trusts the pairs less. Per-expert T = (2, 2) is the same."""
    m = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 1.0]])
    lw = torch.tensor([0.6, 0.4]).log()
    assert user_posterior(lw, m, 2.0).tolist() == pytest.approx([0.743889, 0.256111], abs=1e-6)
    assert user_posterior(lw, m, torch.tensor([2.0, 2.0])).tolist() == pytest.approx([0.743889, 0.256111], abs=1e-6)


def test_posterior_edge_cases():
    """No pairs: q = w. K = 1: q = [1] whatever the pairs. Many confident pairs do not underflow (log space)."""
    lw = torch.tensor([0.2, 0.3, 0.5]).log()
    assert user_posterior(lw, torch.zeros(0, 3)).tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert user_posterior(torch.zeros(1), torch.randn(7, 1)).tolist() == [1.0]
    q = user_posterior(lw, torch.tensor([[-50.0, -60.0, 5.0]]).repeat(100, 1))
    assert torch.isfinite(q).all() and q[2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one per expert"):
        user_posterior(lw, torch.zeros(2, 3), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="> 0"):
        user_posterior(lw, torch.zeros(2, 3), 0.0)


def test_mixture_probability_and_nll_by_hand():
    """w = (0.6, 0.4), Δ = (1, −1): P = 0.6 σ(1) + 0.4 σ(−1) = 0.438635 + 0.107577 = 0.546212; NLL = −log P = 0.604724.
    K = 1 is DPO: P = σ(Δ / T)."""
    lw = torch.tensor([0.6, 0.4]).log()
    m = torch.tensor([[1.0, -1.0]])
    assert float(mixture_probability(lw, m)) == pytest.approx(0.6 * S1 + 0.4 * SM1, abs=1e-6)
    assert float(mixture_nll(lw, m)) == pytest.approx(-math.log(0.546212), abs=1e-5)
    d = torch.tensor([[0.3], [-1.2]])
    assert mixture_probability(torch.zeros(1), d, 0.5).tolist() == pytest.approx(torch.sigmoid(d[:, 0] / 0.5).tolist())


def _simulate(scales: list[float], n: int, seed: int = 0):
    """Pairs whose labels follow σ(Δ_true) of a random expert z ~ U(K), with the model's margins Δ_true_k · s_k.
    Every pair is stored chosen-first, so a pair whose label went the other way has its margins negated."""
    g = torch.Generator().manual_seed(seed)
    K = len(scales)
    true = torch.randn(n, K, generator=g) * 2.0  # (n, K) true log-odds of each expert's rule
    z = torch.randint(K, (n,), generator=g)
    first_wins = torch.rand(n, generator=g) < torch.sigmoid(true[torch.arange(n), z])
    sign = torch.where(first_wins, 1.0, -1.0).unsqueeze(-1)
    return sign * true * torch.tensor(scales)


def test_fit_temperature_recovers_a_known_scale():
    """Margins 3x too large (overconfident): the fitted T is about 3, and the ECE falls. K = 1 (DPO) and K = 2
    with one shared scale."""
    for scales in ([3.0], [3.0, 3.0]):
        m = _simulate(scales, 20000)
        lw = torch.full((len(scales),), -math.log(len(scales)))
        t = fit_temperature(lw, m)
        assert t.shape == (1,) and float(t) == pytest.approx(3.0, rel=0.08)
        before = expected_calibration_error(mixture_probability(lw, m))
        after = expected_calibration_error(mixture_probability(lw, m, t))
        assert after < before / 3 and after < 0.02
        assert float(mixture_nll(lw, m, t)) < float(mixture_nll(lw, m))


def test_fit_temperature_per_expert():
    """Expert 0 overconfident (×2), expert 1 underconfident (×0.5): per-expert T ≈ (2, 0.5)."""
    m = _simulate([2.0, 0.5], 30000, seed=1)
    t = fit_temperature(torch.tensor([0.5, 0.5]).log(), m, per_expert=True)
    assert t.shape == (2,) and t.tolist() == pytest.approx([2.0, 0.5], rel=0.12)


def test_ece_hand_example():
    """docstring example: P = (0.9, 0.8, 0.3, 0.6), 2 bins → 0.15; 1 bin: |3/4 − 0.75| = 0."""
    p = torch.tensor([0.9, 0.8, 0.3, 0.6])
    assert expected_calibration_error(p, num_bins=2) == pytest.approx(0.15)
    assert expected_calibration_error(p, num_bins=1) == pytest.approx(0.0)
    assert decision_accuracy(torch.tensor([0.7, 0.5, 0.2])).tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="no pairs"):
        expected_calibration_error(torch.zeros(0))


def test_user_mixture_nll_by_hand():
    """w = (0.6, 0.4); user 0 has pairs (1, −1), (2, 0), user 1 has (0, 1):
    user 0: 0.6 σ(1) σ(2) + 0.4 σ(−1) σ(0) = 0.386359 + 0.053788 = 0.440137
    user 1: 0.6 σ(0) + 0.4 σ(1) = 0.3 + 0.292423 = 0.592423
    NLL = −(log 0.440137 + log 0.592423) / 3 = 0.448068. One pair per user: the per-pair mixture NLL."""
    lw = torch.tensor([0.6, 0.4]).log()
    m = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 1.0]])
    assert float(user_mixture_nll(lw, m, torch.tensor([0, 0, 1]))) == pytest.approx(0.448068, abs=1e-5)
    assert float(user_mixture_nll(lw, m, torch.tensor([2, 0, 1]))) == pytest.approx(float(mixture_nll(lw, m)))
    # the prior is each user's mean gate weight: (B, K) weights that differ within a user
    lw_b = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.6, 0.4]]).log()
    assert float(user_mixture_nll(lw_b, m, torch.tensor([0, 0, 1]))) == pytest.approx(0.448068, abs=1e-5)


def test_fit_temperature_by_user():
    """Users whose labels all follow one random expert's rule, margins 2x too large: the user-level fit finds T ≈ 2."""
    g = torch.Generator().manual_seed(3)
    n_users, per, K = 400, 10, 2
    true = torch.randn(n_users * per, K, generator=g) * 2.0
    z = torch.randint(K, (n_users,), generator=g).repeat_interleave(per)
    users = torch.arange(n_users).repeat_interleave(per)
    wins = torch.rand(n_users * per, generator=g) < torch.sigmoid(true[torch.arange(n_users * per), z])
    m = torch.where(wins, 1.0, -1.0).unsqueeze(-1) * true * 2.0
    t = fit_temperature(torch.tensor([0.5, 0.5]).log(), m, users=users)
    assert float(t) == pytest.approx(2.0, rel=0.1)
