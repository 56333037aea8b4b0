"""mixdpo_ds.apps.datasets.rankings: every pair split 2-vs-1 by the rules, labels that follow the labelling group's
rule, the same items as pairs, seeded."""
from __future__ import annotations

import itertools

import pytest

from mixdpo_ds.apps.datasets.rankings import GROUPS, LAYOUTS, RankedReviewsConfig, check_layout, generate, rule_counts


@pytest.mark.parametrize("m", sorted(LAYOUTS))
def test_every_pair_is_split_two_to_one_and_labels_follow_the_rule(m):
    check_layout(m)
    data = generate(RankedReviewsConfig(num_items=60, num_test=10, m=m, seed=3))
    for row in data["train_ranked"]:
        counts = [rule_counts(row["responses"][j]) for j in row["ranking"]]  # best first
        own = [c[row["group"]] for c in counts]
        assert own == sorted(own, reverse=True) and len(set(own)) == m  # a strict order by the group's own rule
        for a, b in itertools.combinations(range(m), 2):  # no pair is unanimous between the three rules
            assert sum(counts[a][g] > counts[b][g] for g in GROUPS) in (1, 2)
        assert len({len(y.split()) for y in row["responses"]}) == 1  # equal lengths: no length cue
    for ranked, pair in zip(data["train_ranked"], data["train_pairs"], strict=True):
        g = ranked["group"]
        assert pair["group"] == g and pair["prompt"] == ranked["prompt"]
        assert {pair["chosen"], pair["rejected"]} <= set(ranked["responses"])
        assert rule_counts(pair["chosen"])[g] > rule_counts(pair["rejected"])[g]
    assert len(data["test_allpairs"]) == 10 * m * (m - 1) // 2
    assert {r["group"] for r in data["train_ranked"]} == set(GROUPS)
    assert generate(RankedReviewsConfig(num_items=60, num_test=10, m=m, seed=3)) == data


def test_config_checks():
    with pytest.raises(ValueError, match=r"rankings.m must be one of \[3, 4\]"):
        RankedReviewsConfig(m=5)
    with pytest.raises(ValueError, match="rankings.length must be >= 9"):
        RankedReviewsConfig(m=4, length=8)
