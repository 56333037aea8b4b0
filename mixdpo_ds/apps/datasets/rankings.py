"""Ranked review data whose three annotator groups conflict on every pair (docs/math.md §15).

Three groups, each ranking an item's m responses by its own rule, a count of one word class of the review vocabulary:

    praise   the number of positive adjectives   ("great", "superb", …)
    detail   the number of specific nouns        ("plot", "pacing", …)
    calm     the number of neutral adjectives    ("slow", "plain", …)

The counts are laid out so that the three groups' rankings of an item's responses disagree on **every pair** 2-vs-1
(no pair is unanimous). A pairwise label is then consistent with two of the three rules whenever its annotator is in
the majority, so it cannot say which of those two produced it; the full ranking is a different permutation for each
group and says exactly which one did. The layouts, as each group's ranking of responses 0..m-1 (best first):

    m = 3:  praise (0, 1, 2), detail (2, 0, 1), calm (1, 2, 0)            the three cyclic rotations
    m = 4:  praise (0, 1, 2, 3), detail (3, 2, 1, 0), calm (1, 3, 0, 2)   detail reverses praise

Response j holds, for every group g, (m − 1 − rank_g(j)) words of g's class, then filler words ("the", "it", "and",
"very", …) up to a fixed length, shuffled, and a final "." — so every response of an item has the same length and
the same number of rule words of each kind overall; only their mix differs. Labels are the group's exact order
(no noise: the point is identifiability, not robustness).

Files (jsonl, same seed → same bytes):
    ranked  {"prompt", "responses" (listed in a random order), "ranking" (indices best first), "group"}
    pairs   the same items as pairs: one random pair of the item's responses, ordered by its group's rule
            {"prompt", "chosen", "rejected", "group"}
    allpairs  every pair of every item (m(m−1)/2 rows per item), for per-rule accuracies of the experts
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import numpy as np

from mixdpo_ds.apps.datasets import vocab
from mixdpo_ds.apps.datasets.reviews import write_jsonl

GROUPS = ("praise", "detail", "calm")
CLASS_WORDS = {"praise": vocab.POSITIVE_ADJ, "detail": vocab.SINGULAR_NOUNS + vocab.PLURAL_NOUNS,
               "calm": tuple(sorted(vocab.NEUTRAL_ADJ))}
FILLER = ("the", "it", "this", "and", "very", "really", "quite", "is", "was")
LAYOUTS = {  # m -> each group's ranking of responses 0..m-1, best first
    3: {"praise": (0, 1, 2), "detail": (2, 0, 1), "calm": (1, 2, 0)},
    4: {"praise": (0, 1, 2, 3), "detail": (3, 2, 1, 0), "calm": (1, 3, 0, 2)},
}


@dataclass
class RankedReviewsConfig:
    num_items: int = field(default=2000, metadata={"help": "training items (one ranking each)"})
    num_test: int = field(default=300, metadata={"help": "held-out items"})
    m: int = field(default=3, metadata={"help": f"responses per item, one of {sorted(LAYOUTS)}"})
    length: int = field(default=12, metadata={"help": "words per response before the final '.'"})
    seed: int = field(default=0, metadata={"help": "one seed for everything"})

    def __post_init__(self):
        if self.m not in LAYOUTS:
            raise ValueError(f"rankings.m must be one of {sorted(LAYOUTS)}, got {self.m!r}")
        need = 3 * (self.m - 1)  # the most rule words one response can hold
        if self.length < need:
            raise ValueError(f"rankings.length must be >= {need} for m = {self.m}, got {self.length!r}")


def check_layout(m: int) -> None:
    """Every pair of responses is split 2-vs-1 by the three rankings, and the three rankings differ."""
    ranks = {g: {j: r for r, j in enumerate(order)} for g, order in LAYOUTS[m].items()}
    for i, j in itertools.combinations(range(m), 2):
        votes = sum(ranks[g][i] < ranks[g][j] for g in GROUPS)
        if votes in (0, 3):
            raise AssertionError(f"m = {m}: responses {i} and {j} are ranked the same way by every group")
    if len({LAYOUTS[m][g] for g in GROUPS}) != 3:
        raise AssertionError(f"m = {m}: two groups share a ranking")


def rule_counts(response: str) -> dict[str, int]:
    """Each group's rule: the number of words of its class in the response."""
    words = response.split()
    return {g: sum(w in CLASS_WORDS[g] for w in words) for g in GROUPS}


def make_item(rng: np.random.Generator, cfg: RankedReviewsConfig) -> dict:
    """One item: a prompt, m responses (in layout order) and the labelling group."""
    layout = LAYOUTS[cfg.m]
    group = GROUPS[int(rng.integers(len(GROUPS)))]
    prompt = f"review of the {vocab.DOMAINS[int(rng.integers(2))]} :"
    responses = []
    for j in range(cfg.m):
        words = []
        for g in GROUPS:
            level = cfg.m - 1 - layout[g].index(j)
            words += [str(rng.choice(CLASS_WORDS[g])) for _ in range(level)]
        words += [str(rng.choice(FILLER)) for _ in range(cfg.length - len(words))]
        rng.shuffle(words)
        responses.append(" ".join(words) + " .")
    return {"prompt": prompt, "responses": responses, "group": group, "order": list(layout[group])}


def as_rows(item: dict, rng: np.random.Generator) -> dict[str, list[dict]]:
    """The item as a ranked row (responses listed in a random order), one random pair, and all its pairs."""
    m = len(item["responses"])
    listing = rng.permutation(m).tolist()  # listing[p] = layout index of the response listed at position p
    where = {j: p for p, j in enumerate(listing)}
    ranked = {"prompt": item["prompt"], "responses": [item["responses"][j] for j in listing],
              "ranking": [where[j] for j in item["order"]], "group": item["group"]}
    rank = {j: r for r, j in enumerate(item["order"])}

    def pair(i: int, j: int) -> dict:
        a, b = (i, j) if rank[i] < rank[j] else (j, i)
        return {"prompt": item["prompt"], "chosen": item["responses"][a], "rejected": item["responses"][b],
                "group": item["group"]}
    i, j = rng.choice(m, size=2, replace=False).tolist()
    return {"ranked": [ranked], "pairs": [pair(i, j)],
            "allpairs": [pair(i, j) for i, j in itertools.combinations(range(m), 2)]}


def generate(cfg: RankedReviewsConfig) -> dict[str, list[dict]]:
    """{"train_ranked", "train_pairs", "test_ranked", "test_pairs", "test_allpairs"} rows from one seeded stream
    per split; train_pairs holds the same items as train_ranked."""
    check_layout(cfg.m)
    out = {}
    for split, n in (("train", cfg.num_items), ("test", cfg.num_test)):
        rng = np.random.default_rng([cfg.seed, cfg.m, split == "test"])
        rows = [as_rows(make_item(rng, cfg), rng) for _ in range(n)]
        for kind in ("ranked", "pairs", "allpairs"):
            out[f"{split}_{kind}"] = [r for parts in rows for r in parts[kind]]
    del out["train_allpairs"]
    return out


def write_ranked_task(cfg: RankedReviewsConfig, out_dir: str) -> dict[str, str]:
    """Generate and write the splits of `generate` as `<name>.jsonl` under out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    return {name: write_jsonl(rows, os.path.join(out_dir, f"{name}.jsonl")) for name, rows in generate(cfg).items()}


def main(argv: list[str] | None = None) -> int:
    """python -m mixdpo_ds.apps.datasets.rankings OUT_DIR [--m 3] [--items 4000] [--test 300] [--seed 0]"""
    import argparse

    p = argparse.ArgumentParser(description="Write the pairwise-conflicting ranked review data (docs/math.md §15).")
    p.add_argument("out_dir")
    p.add_argument("--m", type=int, default=3)
    p.add_argument("--items", type=int, default=4000)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name, path in write_ranked_task(RankedReviewsConfig(a.items, a.test, a.m, seed=a.seed), a.out_dir).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
