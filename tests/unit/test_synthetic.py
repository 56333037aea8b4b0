"""Synthetic review data (mixdpo_ds.apps.datasets): annotator rules, generator, Bayes ceilings — by hand."""
import json

import numpy as np
import pytest

from mixdpo_ds.apps.datasets import vocab
from mixdpo_ds.apps.datasets.annotators import ANNOTATORS, grammar, grammar_errors, informativeness, sentiment
from mixdpo_ds.apps.datasets.ceilings import (
    bayes_ceilings,
    best_single_reward,
    decision_accuracy,
    disagreement_matrix,
    reward_margins,
    simplex_grid,
)
from mixdpo_ds.apps.datasets.reviews import ReviewsConfig, bt_probability, corpus_texts, generate, write_task


def test_sentiment_is_vader_compound_rescaled():
    """VADER: 'great' has valence 3.1, one word, no '!' → compound = 3.1 / sqrt(3.1² + 15) = 3.1 / 4.9608 = 0.6249
    (VADER rounds to 4 places) → (0.6249 + 1) / 2 = 0.81245. A sentence of lexicon-free words is 0.5."""
    assert sentiment("review of jaws :", "it is great .") == pytest.approx(0.81245, abs=1e-6)
    assert sentiment("review of jaws :", "the plot is long .") == 0.5
    assert sentiment("", "it is awful .") < 0.5 < sentiment("", "it is good .")


def test_informativeness_by_hand():
    """'the pacing is slow and the plot is great .': nouns {pacing, plot} = 2, neutral adj {slow} = 1
    → (2 + 0.5) / 4.5 = 0.5556. Repeated nouns count once; vague subjects count nothing."""
    assert informativeness("", "the pacing is slow and the plot is great .") == pytest.approx(2.5 / 4.5)
    assert informativeness("", "the plot is good and the plot is bad .") == pytest.approx(1 / 4.5)
    assert informativeness("", "it is great .") == 0.0
    many = "the plot is slow and the tone is dark and the scenes are short and the story is long and the ending is"
    assert informativeness("", many) == 1.0  # 5 nouns + 4·0.5 = 7 → clipped


@pytest.mark.parametrize(
    "text,errors",
    [
        ("the plot is great .", 0),
        ("the scenes are great .", 0),
        ("the plot are great .", 1),  # agreement
        ("the scenes was dull .", 1),  # agreement
        ("the plot is great", 1),  # missing period
        ("the the plot is great .", 1),  # repeat
        ("great is the plot .", 1),  # copula without a noun subject
        ("the plot are great and and it is good", 3),  # agreement + repeat + missing period
        ("", 1),
    ],
)
def test_grammar_errors_by_hand(text, errors):
    assert grammar_errors(text) == errors
    assert grammar("", text) == pytest.approx(1 / (1 + errors))


def test_bt_probability_by_hand():
    """sigmoid((0.6 − 0.5) / 0.05) = sigmoid(2) = 1 / (1 + e^-2) = 0.880797; temperature 0 → step; tie → 0.5."""
    assert bt_probability(0.6, 0.5, 0.05) == pytest.approx(0.880797, abs=1e-6)
    assert bt_probability(0.6, 0.5, 0.0) == 1.0
    assert bt_probability(0.4, 0.5, 0.0) == 0.0
    assert bt_probability(0.5, 0.5, 0.05) == 0.5


def test_generator_is_deterministic_and_seeded():
    cfg = ReviewsConfig(num_train=50, num_test=20, num_sft=30, seed=3)
    a, b = generate(cfg), generate(cfg)
    assert a == b
    assert generate(ReviewsConfig(num_train=50, num_test=20, num_sft=30, seed=4))["train"] != a["train"]
    assert all(r["chosen"] != r["rejected"] for r in a["train"] + a["test"])


def test_generator_uses_only_the_vocabulary_and_short_rows():
    words = set(vocab.all_words())
    data = generate(ReviewsConfig(task="contextual", num_train=200, num_test=10, num_sft=10))
    for r in data["train"]:
        text = f"{r['prompt']} {r['chosen']} {r['rejected']}"
        assert set(text.split()) <= words
        assert len(r["chosen"].split()) <= 20 and len(r["rejected"].split()) <= 20
    assert set(" ".join(corpus_texts()).split()) == words


def test_contextual_group_is_the_prompt_domain():
    data = generate(ReviewsConfig(task="contextual", num_train=100, num_test=10, num_sft=10))
    for r in data["train"]:
        assert r["group"] == r["domain"] and r["prompt"].startswith(r["domain"] + " ")
        assert r["user"].startswith(r["group"] + "_")
    assert {r["group"] for r in data["train"]} == {"movie", "book"}


def test_multi_groups_are_independent_of_prompt():
    data = generate(ReviewsConfig(num_train=600, num_test=10, num_sft=10))
    counts = {g: sum(r["group"] == g for r in data["train"]) for g in ANNOTATORS}
    assert all(150 < c < 250 for c in counts.values()), counts
    assert all(r["prompt"].startswith("review of ") for r in data["train"])


def test_labels_follow_the_groups_rule():
    """With temperature 0 every non-tied pair's chosen response has the higher reward of its group."""
    cfg = ReviewsConfig(num_train=300, num_test=10, num_sft=10, temperature=0.0)
    rows = generate(cfg)["train"]
    margins = reward_margins(rows, cfg)
    gidx = [cfg.groups().index(r["group"]) for r in rows]
    own = margins[np.arange(len(rows)), gidx]
    assert (own >= 0).all() and (own > 0).mean() > 0.6


def test_write_task_loads_with_datasets_json(tmp_path):
    from datasets import load_dataset

    paths = write_task(ReviewsConfig(num_train=20, num_test=5, num_sft=7), str(tmp_path))
    ds = load_dataset("json", data_files=paths["train"], split="train")
    assert len(ds) == 20 and {"prompt", "chosen", "rejected", "group", "user"} <= set(ds.column_names)
    assert len(load_dataset("json", data_files=paths["sft"], split="train")) == 7
    cfg = json.loads((tmp_path / "reviews_config.json").read_text())
    assert cfg["num_train"] == 20
    assert (tmp_path / "train.jsonl").read_bytes() == open(write_task(
        ReviewsConfig(num_train=20, num_test=5, num_sft=7), str(tmp_path / "again"))["train"], "rb").read()


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"reviews.task must be one of \['multi', 'contextual'\]"):
        ReviewsConfig(task="foo")
    with pytest.raises(ValueError, match="reviews.temperature"):
        ReviewsConfig(temperature=-1)
    with pytest.raises(ValueError, match="reviews.contextual_rewards"):
        ReviewsConfig(contextual_rewards={"movie": "humour"})


# Three hand-made pairs, one per group (temperature 0). Group probabilities p = P_g(chosen ≻ rejected):
#   1 sentiment:       great vs awful, same nouns, both grammatical    → p = [1, .5, .5]
#   2 grammar:         "plot is" vs "plot are" (same VADER, same info) → p = [.5, .5, 1]
#   3 informativeness: "the plot is bad" vs "it is good"               → p = [0, 1, .5]
HAND_ROWS = [
    {"prompt": "review of jaws :", "chosen": "it is great .", "rejected": "it is awful .", "group": "sentiment"},
    {"prompt": "review of jaws :", "chosen": "the plot is good .", "rejected": "the plot are good .",
     "group": "grammar"},
    {"prompt": "review of jaws :", "chosen": "the plot is bad .", "rejected": "it is good .",
     "group": "informativeness"},
]


def test_ceilings_by_hand():
    """prior = (1/3, 1/3, 1/3).
    oracle routed: each pair's own rule says p = 1 → accuracy 1.
    mixture P = mean_g p: row1 2/3 → 1, row2 2/3 → 1, row3 (0 + 1 + .5)/3 = .5 → tie 0.5; mean 2.5/3 = 0.8333.
    oracle recovery: argmax of p (uniform prior) = the true group in all rows → 1; chance = 1/3.
    disagreement(sentiment, informativeness): row1 1·.5 + 0·.5 = .5, row2 .5·.5 + .5·.5 = .5, row3 0·0 + 1·1 = 1
    → 2/3; diagonal(sentiment): 2p(1 − p) = 0, .5, 0 → 1/6."""
    cfg = ReviewsConfig(temperature=0.0)
    ceil = bayes_ceilings(HAND_ROWS, HAND_ROWS, cfg)
    assert ceil["oracle_routed_accuracy"]["all"] == 1.0
    assert ceil["best_mixture_accuracy"]["all"] == pytest.approx(2.5 / 3)
    assert ceil["best_mixture_accuracy"]["informativeness"] == 0.5
    assert ceil["oracle_recovery"] == 1.0
    assert ceil["chance_recovery"] == pytest.approx(1 / 3)
    dis = np.array(ceil["disagreement"])
    assert dis[0, 1] == pytest.approx(2 / 3) and dis[1, 0] == pytest.approx(2 / 3)
    assert dis[0, 0] == pytest.approx(1 / 6)
    assert np.allclose(disagreement_matrix(HAND_ROWS, cfg), dis)


def test_simplex_grid_and_best_single_reward():
    """grid(2, 0.5) = {(0, 1), (.5, .5), (1, 0)}. Three copies of hand row 3 (info +, sentiment −, grammar 0): the
    first grid point in order, (0, 0, 1), scores 0 (tie, 0.5); the next, (0, 0.05, 0.95), scores > 0 → accuracy 1."""
    assert simplex_grid(2, 0.5).tolist() == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    assert simplex_grid(3, 0.05).shape == (231, 3)  # C(22, 2)
    rows = [HAND_ROWS[2]] * 3
    a = best_single_reward(rows, ReviewsConfig(temperature=0.0))
    assert a.tolist() == pytest.approx([0.0, 0.05, 0.95])


def test_decision_accuracy():
    assert decision_accuracy(np.array([0.9, 0.1, 0.5])).tolist() == [1.0, 0.0, 0.5]


def test_generated_data_has_the_issue_properties():
    """The measured facts the demo relies on: groups disagree (~0.5 off-diagonal), recovery is hard (oracle well
    below 1 but above chance), a mixture barely beats one reward, routing by group helps a lot."""
    cfg = ReviewsConfig(num_train=800, num_test=600, num_sft=10)
    data = generate(cfg)
    ceil = bayes_ceilings(data["train"], data["test"], cfg)
    dis = np.array(ceil["disagreement"])
    assert (dis[~np.eye(3, dtype=bool)] > 0.4).all() and (np.diag(dis) < 0.25).all()
    assert ceil["chance_recovery"] + 0.1 < ceil["oracle_recovery"] < 0.7
    assert abs(ceil["best_mixture_accuracy"]["all"] - ceil["best_single_reward_accuracy"]["all"]) < 0.05
    assert ceil["oracle_routed_accuracy"]["all"] > ceil["best_mixture_accuracy"]["all"] + 0.1
    ctx = ReviewsConfig(task="contextual", num_train=400, num_test=400, num_sft=10)
    cdata = generate(ctx)
    assert bayes_ceilings(cdata["train"], cdata["test"], ctx)["prompt_recovery"] == 1.0


def test_drop_ties_redraws_until_the_groups_reward_separates_the_pair():
    """Default: no pair ties under its own group's reward (annotators skip pairs they are indifferent about);
    drop_ties=False keeps ties (a coin flip each), which the grammar rule makes common."""
    for task in ("multi", "contextual"):
        cfg = ReviewsConfig(task=task, num_train=400, num_test=10, num_sft=10)
        rows = generate(cfg)["train"]
        margins = reward_margins(rows, cfg)
        own = margins[np.arange(len(rows)), [cfg.groups().index(r["group"]) for r in rows]]
        assert (own != 0).all(), task
    cfg = ReviewsConfig(num_train=400, num_test=10, num_sft=10, drop_ties=False)
    rows = generate(cfg)["train"]
    own = reward_margins(rows, cfg)[np.arange(len(rows)), [cfg.groups().index(r["group"]) for r in rows]]
    assert (own == 0).mean() > 0.05
