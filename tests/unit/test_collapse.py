"""Tests of mixdpo_ds.core.collapse: merged / dead experts, saturated gate, the metrics, split-and-merge re-seeding.

Every verdict below is computed by hand in the comments next to the inputs.
"""

import math

import pytest
import torch

from mixdpo_ds.core.collapse import (
    collapse_metrics,
    collapse_report,
    dead_experts,
    gate_entropy,
    margin_correlation,
    merged_experts,
    saturated_gate,
    sign_agreement,
    split_expert,
    split_responsibility,
    split_source,
)

torch.set_num_threads(1)

# 10 pairs; expert 1 = expert 0, expert 2 = −expert 0: r(0,1) = 1, agree 10/10; r(0,2) = r(1,2) = −1, agree 0/10
BASE = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.5, 2.5, -0.5, 4.0, 1.2, -3.3])
IDENTICAL_AND_OPPOSITE = torch.stack([BASE, BASE, -BASE], 1)


def _agree_not_correlated() -> torch.Tensor:
    """100 pairs, 2 experts. 96 pairs: (a, b) over {1, 3}² with 24 pairs each (all positive → agree);
    4 pairs: (2, −2), (2, −2), (−2, 2), (−2, 2) (disagree). Sign agreement 96/100 = 0.96 ≥ 0.95.
    Σa = Σb = 24·2·(1 + 3) = 192 → mean 1.92; Σab = 24·(1 + 3 + 3 + 9) − 4·4 = 368; Σa² = 48·1 + 48·9 + 4·4 = 496.
    cov = 3.68 − 1.92² = −0.0064, var = 4.96 − 3.6864 = 1.2736, r = −0.0064 / 1.2736 = −0.0050251."""
    rows = [(1.0, 1.0), (1.0, 3.0), (3.0, 1.0), (3.0, 3.0)] * 24 + [(2.0, -2.0)] * 2 + [(-2.0, 2.0)] * 2
    return torch.tensor(rows)


AGREE_R = -0.0064 / 1.2736


# ----------------------------------------------------------------------------- merged experts

def test_identical_merged_opposite_not():
    assert merged_experts(IDENTICAL_AND_OPPOSITE) == [(0, 1)]
    corr = margin_correlation(IDENTICAL_AND_OPPOSITE)
    assert torch.allclose(corr, torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]], dtype=torch.float64))
    agree = sign_agreement(IDENTICAL_AND_OPPOSITE)
    assert agree[0, 1] == 1 and agree[0, 2] == 0 and agree[1, 2] == 0


def test_sign_agreement_without_correlation_is_not_merged():
    m = _agree_not_correlated()
    assert sign_agreement(m)[0, 1].item() == pytest.approx(0.96)
    assert margin_correlation(m)[0, 1].item() == pytest.approx(AGREE_R, abs=1e-9)
    assert merged_experts(m) == []
    # the sign rule alone would merge them: the correlation rule is what rejects the pair
    assert merged_experts(m, min_corr=-1.0) == [(0, 1)]
    # and at 97% required agreement the sign rule rejects them too
    assert merged_experts(m, agree=0.97, min_corr=-1.0) == []


def test_offset_copy_is_correlated_but_not_merged():
    # expert 1 = expert 0 + 2: r = 1, but signs agree only where Δ_0 ∉ [−2, 0): BASE has −2, −1.5, −0.5 there
    # → 7/10 = 0.7 < 0.95
    m = torch.stack([BASE, BASE + 2.0], 1)
    assert margin_correlation(m)[0, 1].item() == pytest.approx(1.0)
    assert sign_agreement(m)[0, 1].item() == pytest.approx(0.7)
    assert merged_experts(m) == []
    assert merged_experts(m, agree=0.7) == [(0, 1)]


def test_rescaled_copy_is_merged():
    m = torch.stack([BASE, 0.1 * BASE], 1)  # same decisions, weaker: r = 1, agree 1
    assert merged_experts(m) == [(0, 1)]


def test_min_pairs():
    assert merged_experts(IDENTICAL_AND_OPPOSITE[:7]) == []  # 7 < 8 pairs: no verdict
    assert merged_experts(IDENTICAL_AND_OPPOSITE[:7], min_pairs=7) == [(0, 1)]


def test_constant_margins_have_zero_correlation():
    # Δ ≡ 0 (every expert = π_ref) and Δ ≡ 1: no variance → r = 0, never merged, no NaN
    m = torch.stack([torch.zeros(10), torch.zeros(10), torch.ones(10), BASE], 1)
    corr = margin_correlation(m)
    assert torch.isfinite(corr).all()
    assert corr[:3].abs().max() == 0 and corr[:, :3].abs().max() == 0 and corr[3, 3] == 1
    assert merged_experts(m) == []


def test_merged_lists_every_pair_in_order():
    # experts 0, 2, 3 identical; 1 opposite → (0, 2), (0, 3), (2, 3)
    m = torch.stack([BASE, -BASE, BASE, BASE], 1)
    assert merged_experts(m) == [(0, 2), (0, 3), (2, 3)]


# ----------------------------------------------------------------------------- dead experts

def test_dead_expert():
    # column means: (0.6 + 0.5 + 0.4)/3 = 0.5, (0.39 + 0.49 + 0.59)/3 = 0.49, 0.01
    resp = torch.tensor([[0.6, 0.39, 0.01], [0.5, 0.49, 0.01], [0.4, 0.59, 0.01]])
    assert dead_experts(resp) == [2]
    assert dead_experts(resp, min_mass=0.009) == []
    assert dead_experts(torch.tensor([[0.5, 0.25, 0.25]]), min_mass=0.25) == []  # strict: 0.25 is not < 0.25
    assert dead_experts(resp, min_mass=0.495) == [1, 2]
    assert dead_experts(torch.tensor([0.97, 0.015, 0.015])) == [1, 2]  # Mix-DPO (K,) vector


# ----------------------------------------------------------------------------- saturated gate

def test_uniform_gate_not_saturated():
    w = torch.full((10, 3), 1 / 3)
    assert gate_entropy(w).item() == pytest.approx(math.log(3))
    assert not saturated_gate(w, IDENTICAL_AND_OPPOSITE)  # merged experts, but entropy = log 3


def test_one_hot_gate_with_merged_experts_saturated():
    w = torch.zeros(10, 3)
    w[:, 0] = 1.0
    assert gate_entropy(w).item() == 0.0
    assert saturated_gate(w, IDENTICAL_AND_OPPOSITE)


def test_one_hot_gate_with_distinct_experts_not_saturated():
    w = torch.zeros(10, 3)
    w[torch.arange(10), torch.arange(10) % 3] = 1.0
    # (0,1): r = −1; (0,2): r = 1 but agree 7/10 (test_offset_copy…); (1,2): r = −1, agree 2/10 → none merged
    distinct = torch.stack([BASE, -BASE, BASE + 2.0], 1)
    assert merged_experts(distinct) == []
    assert not saturated_gate(w, distinct)


def test_entropy_threshold():
    # K = 3: threshold 0.05 · log 3 = 0.0549306
    # H(0.99, 0.005, 0.005) = 0.99·0.0100503 + 2·0.005·5.298317 = 0.0629330 → above: not saturated
    # H(0.998, 0.001, 0.001) = 0.998·0.0020020 + 2·0.001·6.907755 = 0.0158135 → below: saturated
    soft, sharp = torch.tensor([0.99, 0.005, 0.005]), torch.tensor([0.998, 0.001, 0.001])
    assert gate_entropy(soft).item() == pytest.approx(0.0629330, abs=1e-6)
    assert gate_entropy(sharp).item() == pytest.approx(0.0158135, abs=1e-6)
    assert not saturated_gate(soft.expand(10, 3), IDENTICAL_AND_OPPOSITE)
    assert saturated_gate(sharp.expand(10, 3), IDENTICAL_AND_OPPOSITE)
    assert saturated_gate(soft.expand(10, 3), IDENTICAL_AND_OPPOSITE, entropy_frac=0.06)  # 0.0659 > 0.0629


def test_single_expert_never_saturated():
    assert not saturated_gate(torch.ones(10, 1), BASE[:, None])


# ----------------------------------------------------------------------------- report and metrics

# 3 pairs, K = 3. Expert 1 = 2·expert 0 (r = 1, agree 3/3). Expert 2 = (3, 1, 2): centred (1, −1, 0) against
# expert 0's (−1, 0, 1): cov = −1, norms √2·√2 = 2 → r(0,2) = r(1,2) = −0.5. Max r = 1.
M3 = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 1.0], [3.0, 6.0, 2.0]])
# column means (0.5, 0.49, 0.01): expert 2 dead, min mass 0.01
R3 = torch.tensor([[0.6, 0.39, 0.01], [0.5, 0.49, 0.01], [0.4, 0.59, 0.01]])
W3 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # one-hot: entropy 0 → saturated


def test_report_three_pairs():
    assert collapse_report(M3, R3, W3, min_pairs=3) == {"merged": [(0, 1)], "dead": [2], "saturated": True}
    # with the default min_pairs = 8, three pairs give no merge verdict, hence no saturation
    assert collapse_report(M3, R3, W3) == {"merged": [], "dead": [2], "saturated": False}


def test_metrics_three_pairs():
    got = collapse_metrics(M3, R3, W3, min_pairs=3)
    assert set(got) == {"collapse/merged_pairs", "collapse/dead_experts", "collapse/gate_saturated",
                        "collapse/min_resp_mass", "collapse/max_margin_corr"}
    assert all(isinstance(v, float) for v in got.values())
    assert got["collapse/merged_pairs"] == 1.0
    assert got["collapse/dead_experts"] == 1.0
    assert got["collapse/gate_saturated"] == 1.0
    assert got["collapse/min_resp_mass"] == pytest.approx(0.01)
    assert got["collapse/max_margin_corr"] == pytest.approx(1.0)
    assert margin_correlation(M3)[0, 2].item() == pytest.approx(-0.5)
    assert margin_correlation(M3)[1, 2].item() == pytest.approx(-0.5)


def test_metrics_healthy_mixture():
    # the agree-but-uncorrelated pair, balanced responsibilities, uniform gate: nothing collapsed
    m = _agree_not_correlated()
    got = collapse_metrics(m, torch.full((100, 2), 0.5), torch.full((100, 2), 0.5))
    assert got == pytest.approx({"collapse/merged_pairs": 0.0, "collapse/dead_experts": 0.0,
                                 "collapse/gate_saturated": 0.0, "collapse/min_resp_mass": 0.5,
                                 "collapse/max_margin_corr": AGREE_R})


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="K = 2"):
        collapse_report(M3, R3[:, :2], W3)


# ----------------------------------------------------------------------------- split-and-merge re-seeding

def test_split_source_is_most_loaded():
    assert split_source(R3) == 0  # means (0.5, 0.49, 0.01)
    assert split_source(R3, exclude=0) == 1
    assert split_source(R3, exclude=[0, 1]) == 2


def test_split_expert_exact_copy():
    g = torch.Generator().manual_seed(0)
    heads = torch.randn(3, 8, 4, generator=g)
    before = heads.clone()
    split_expert(heads, dead=2, source=0, noise=0.0)
    assert torch.equal(heads[2], before[0])
    assert torch.equal(heads[:2], before[:2])


def test_split_expert_noise_scale():
    g = torch.Generator().manual_seed(0)
    heads = torch.nn.Parameter(3.0 * torch.randn(3, 200, 100, generator=g))  # source std ≈ 3
    before = heads.detach().clone()
    split_expert(heads, dead=1, source=2, noise=0.1, generator=torch.Generator().manual_seed(1))
    diff = heads.detach()[1] - before[2]
    ratio = diff.std().item() / (0.1 * before[2].std().item())
    assert 0.8 < ratio < 1.2
    assert diff.mean().abs().item() < 0.05  # zero-mean noise: |mean| ≈ 0.3/√20000 = 0.002
    assert torch.equal(heads.detach()[[0, 2]], before[[0, 2]])  # only the dead expert changes
    assert not heads.detach()[1].eq(before[1]).any()  # and all of it is overwritten


def test_split_expert_list_and_seed():
    def heads():
        g = torch.Generator().manual_seed(3)
        return [torch.randn(50, 40, generator=g) for _ in range(3)]
    a, b = heads(), heads()
    split_expert(a, dead=0, source=1, noise=0.05, generator=torch.Generator().manual_seed(7))
    split_expert(b, dead=0, source=1, noise=0.05, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0])  # same generator seed → same noise
    ratio = (a[0] - a[1]).std().item() / (0.05 * a[1].std().item())
    assert 0.8 < ratio < 1.2


def test_split_expert_rejects_bad_indices():
    with pytest.raises(ValueError):
        split_expert(torch.zeros(3, 2, 2), dead=1, source=1, noise=0.0)
    with pytest.raises(ValueError):
        split_expert(torch.zeros(3, 2, 2), dead=3, source=0, noise=0.0)


def test_split_responsibility():
    w = torch.tensor([0.7, 0.29, 0.01], dtype=torch.float64)
    want = torch.tensor([0.35, 0.29, 0.35], dtype=torch.float64) / 0.99
    got = split_responsibility(w, dead=2, source=0)
    assert torch.allclose(got, want)
    assert got.sum().item() == pytest.approx(1.0)
    assert torch.equal(w, torch.tensor([0.7, 0.29, 0.01], dtype=torch.float64))  # input untouched
    # log space in, log space out (auto-detected, and explicit)
    assert torch.allclose(split_responsibility(w.log(), dead=2, source=0).exp(), want)
    assert torch.allclose(split_responsibility(w.log(), dead=2, source=0, log=True).exp(), want)


def test_posterior_information_by_hand():
    """w = (½, ½), σ(Δ) = (¾, ¼): q = (¾, ¼), KL(q ‖ w) = ¾ ln 1.5 + ¼ ln ½ = 0.130812; equal margins give 0."""
    import math

    import torch

    from mixdpo_ds.core.collapse import posterior_information

    log_w = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]], dtype=torch.float64))
    m = math.log(3.0)
    info = posterior_information(log_w[:1], torch.tensor([[m, -m]], dtype=torch.float64))
    assert float(info) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-12)
    assert float(posterior_information(log_w, torch.tensor([[2.0, 2.0], [-1.0, -1.0]]))) == pytest.approx(0, abs=1e-15)
    assert float(posterior_information(log_w, torch.tensor([[m, -m], [0.0, 0.0]]))) == pytest.approx(float(info) / 2)
