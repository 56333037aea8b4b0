"""Best-permutation recovery accuracy of `mixdpo evaluate` (hand-computed confusion matrices)."""
from __future__ import annotations

import pytest

from mixdpo_ds.training.evaluate import best_matching, gate_evidence, recovery_accuracy, summarize


def test_best_matching_hand_example():
    """confusion (rows experts, columns groups) [[1, 5], [4, 0]]: identity matches 1 + 0 = 1, the swap
    (expert 1 ↔ group 0, expert 0 ↔ group 1) matches 4 + 5 = 9 → 9."""
    matched, mapping, method = best_matching([[1, 5], [4, 0]])
    assert (matched, mapping, method) == (9, {0: 1, 1: 0}, "permutations")


def test_recovery_more_experts_than_groups():
    """3 experts, 2 groups. experts [2, 2, 2, 0, 0, 1] vs groups [0, 0, 1, 1, 1, 1]: confusion
    expert 0: (0, 2), expert 1: (0, 1), expert 2: (2, 1); best is expert 2 → group 0 (2) and expert 0 →
    group 1 (2): 4 of 6. Pairs with group -1 are ignored."""
    rec = recovery_accuracy([2, 2, 2, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1, -1], K=3, G=2)
    assert rec["accuracy"] == pytest.approx(4 / 6) and rec["n"] == 6 and rec["mapping"] == {0: 2, 1: 0}


def test_large_k_uses_assignment_solver():
    """K = G = 9 (> 8: no exhaustive search); a shuffled diagonal is recovered exactly by either solver."""
    perm = [3, 1, 4, 0, 5, 8, 2, 6, 7]
    confusion = [[10 if perm[k] == g else 1 for g in range(9)] for k in range(9)]
    matched, mapping, method = best_matching(confusion)
    assert method in ("hungarian", "greedy") and matched == 90 and all(mapping[perm[k]] == k for k in range(9))


def test_summary_accuracies():
    """Two pairs: p_mixture 0.8 (right) and 0.4 (wrong) → accuracy 1/2; expert 0 margins (+1, −1) → 1/2,
    expert 1 margins (+2, +3) → 1."""
    rows = [{"p_mixture": 0.8, "margins": [1.0, 2.0], "resp": [0.9, 0.1], "w": [0.5, 0.5], "loglik": -0.2,
             "group_id": 0, "expert": 0},
            {"p_mixture": 0.4, "margins": [-1.0, 3.0], "resp": [0.2, 0.8], "w": [0.5, 0.5], "loglik": -0.9,
             "group_id": 1, "expert": 1}]
    s = summarize(rows, K=2, group_names={0: "a", 1: "b"})
    assert s["accuracy"] == 0.5 and s["expert_accuracy"] == [0.5, 1.0]
    assert s["per_group"]["a"]["accuracy"] == 1.0 and s["per_group"]["b"]["accuracy"] == 0.0
    assert s["recovery_accuracy"] == 1.0 and s["recovery"]["mapping"] == {"a": 0, "b": 1}


def test_gate_evidence_by_hand():
    """K = 2, the gate gives users a and b w = (0.9, 0.1). a's 5 pairs have margins (−1, 2): Σ log σ = 5·(−1.3133,
    −0.1269) = (−6.566, −0.634); with log w: (−6.672, −2.937), so a's own pairs outvote the gate (log likelihood
    ratio 5.932). b's margins (1, 0): (−1.566, −3.466) + log w agree with the gate. c has 4 pairs (< min_pairs),
    d's gate hedges (0.5, 0.5) and is not counted as locked in; rows without a user are ignored."""
    def rows(user, w, m, n):
        return [{"user": user, "w": list(w), "margins": list(m)} for _ in range(n)]

    data = (rows("a", (0.9, 0.1), (-1.0, 2.0), 5) + rows("b", (0.9, 0.1), (1.0, 0.0), 5)
            + rows("c", (0.9, 0.1), (-1.0, 2.0), 4) + rows("d", (0.5, 0.5), (-1.0, 2.0), 5)
            + rows(None, (0.9, 0.1), (-1.0, 2.0), 9))
    ev = gate_evidence(data)
    assert ev["users_checked"] == 3 and ev["users_disagreeing"] == 1
    (d,) = ev["disagreements"]
    assert (d["user"], d["pairs"], d["gate_expert"], d["posterior_expert"]) == ("a", 5, 0, 1)
    assert d["log_likelihood_ratio"] == pytest.approx(5.932, abs=1e-3)
    assert gate_evidence(data, min_pairs=4)["users_disagreeing"] == 2  # c counts too
