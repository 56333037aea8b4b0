"""Synthetic user features for the gate on user features (`gate.features=…user_features`): each annotator user gets
a profile whose features decide (or hint at) their annotator group, so a gate can route users it never saw.

For a user of group g (index j of the task's groups):
- `pool` (categorical, "p0", "p1", ...): group j's pool with probability p_pool, else a uniformly random pool;
- `profile` (numeric, 2 values): the group's centroid (the vertices of a triangle 2 apart, more groups on a circle)
  plus N(0, noise²) per coordinate: it decides the group (the centroids are far apart against noise 0.3);
- `country` (categorical, FR / DE / US / JP): independent of the group, noise.
`add_user_features(rows, groups, seed, ...)` adds the three columns to every row of its user, the same on each.
"""
from __future__ import annotations

import math

import numpy as np

COUNTRIES = ["FR", "DE", "US", "JP"]


def user_feature_specs(num_groups: int, pool_dim: int = 3, country_dim: int = 2) -> list[dict]:
    """The `gate.user_features` encoders of these columns."""
    return [{"column": "pool", "kind": "categorical", "categories": [f"p{j}" for j in range(num_groups)],
             "dim": pool_dim},
            {"column": "country", "kind": "categorical", "categories": COUNTRIES, "dim": country_dim},
            {"column": "profile", "kind": "numeric", "size": 2}]


def centroid(j: int, num_groups: int) -> np.ndarray:
    if num_groups <= 3:
        return np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]][j])
    a = 2 * math.pi * j / num_groups
    return 2.0 * np.array([math.cos(a), math.sin(a)])


def user_profile(rng: np.random.Generator, j: int, num_groups: int, p_pool: float, noise: float) -> dict:
    """One user's features for group index j."""
    pool = j if rng.random() < p_pool else int(rng.integers(num_groups))
    return {"pool": f"p{pool}", "country": COUNTRIES[int(rng.integers(len(COUNTRIES)))],
            "profile": (centroid(j, num_groups) + rng.normal(0.0, noise, 2)).round(4).tolist()}


def add_user_features(rows: list[dict], groups: list[str], seed: int, p_pool: float = 1.0,
                      noise: float = 0.3) -> dict[str, dict]:
    """Adds pool / country / profile to every row (by its `user` and `group`); returns {user: features}."""
    rng = np.random.default_rng([seed, 7])
    profiles: dict[str, dict] = {}
    for user, group in sorted({(r["user"], r["group"]) for r in rows}):
        profiles[user] = user_profile(rng, groups.index(group), len(groups), p_pool, noise)
    for r in rows:
        r.update(profiles[r["user"]])
    return profiles
