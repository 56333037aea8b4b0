"""What the synthetic data can and cannot show: Bayes ceilings from the true annotator rules.

For each pair i and group g let p_ig = P_g(chosen_i ≻ rejected_i) under group g's Bradley–Terry rule
(`reviews.bt_probability`). A decision rule with probability P for "chosen wins" scores 1 if P > 0.5, 0 if P < 0.5
and 0.5 on a tie, against the recorded (sampled) label. Then:

- `oracle_routed_accuracy`: know each pair's group, use its rule: P = p_i,g(i). No model can beat this on average.
- `best_mixture_accuracy`: the group is unknown; the mixture with the true prior π (train frequencies) predicts
  P = Σ_g π_g p_ig (eq. 2's preference probability with the true experts). This is the best Mix-DPO can do with a
  global w; on prompt-independent groups it is also the best any group-blind model can do.
- `best_single_reward_accuracy`: one reward r = Σ_g a_g r_g (a on a simplex grid, fitted on train): the best a
  single DPO reward in the span of the annotators' rules can do when it cannot see the group.
- `oracle_recovery`: argmax_g of the true posterior π_g(x) p_ig^(y) (y = the recorded label) against the true
  group: the best possible recovery accuracy of any E-step. `chance_recovery` = the largest group frequency.
  `prompt_recovery`: argmax of the prompt-only prior π(x), no label (contextual task: 1.0; multi: about chance).
"""
from __future__ import annotations

import itertools

import numpy as np

from mixdpo_ds.apps.datasets.annotators import ANNOTATORS
from mixdpo_ds.apps.datasets.reviews import ReviewsConfig, bt_probability


def reward_margins(rows: list[dict], cfg: ReviewsConfig) -> np.ndarray:
    """(N, G) r_g(x, chosen) − r_g(x, rejected) for each group's reward, groups in cfg.groups() order."""
    out = np.zeros((len(rows), len(cfg.groups())))
    for j, group in enumerate(cfg.groups()):
        reward = ANNOTATORS[cfg.group_reward_name(group)]
        out[:, j] = [reward(r["prompt"], r["chosen"]) - reward(r["prompt"], r["rejected"]) for r in rows]
    return out


def chosen_probabilities(rows: list[dict], cfg: ReviewsConfig) -> np.ndarray:
    """(N, G) p_ig = P_g(chosen ≻ rejected) under each group's Bradley–Terry rule."""
    margins = reward_margins(rows, cfg)
    return np.vectorize(lambda d: bt_probability(d, 0.0, cfg.temperature))(margins)


def decision_accuracy(p_chosen: np.ndarray) -> np.ndarray:
    """Per-pair accuracy of the decision 'chosen wins iff P > 0.5' against the recorded label: 1, 0 or 0.5 (tie)."""
    return np.where(p_chosen > 0.5, 1.0, np.where(p_chosen < 0.5, 0.0, 0.5))


def disagreement_matrix(rows: list[dict], cfg: ReviewsConfig) -> np.ndarray:
    """(G, G) expected rate at which labels drawn by groups g and h for the same pair differ:
    mean_i p_ig (1 − p_ih) + (1 − p_ig) p_ih. The diagonal is a group's own label noise.

    Example: p_g = 0.9, p_h = 0.2 on one pair → 0.9·0.8 + 0.1·0.2 = 0.74.
    """
    p = chosen_probabilities(rows, cfg)
    return (p[:, :, None] * (1 - p[:, None, :]) + (1 - p[:, :, None]) * p[:, None, :]).mean(0)


def _group_index(rows: list[dict], cfg: ReviewsConfig) -> np.ndarray:
    groups = cfg.groups()
    return np.array([groups.index(r["group"]) for r in rows])


def _by_group(acc: np.ndarray, gidx: np.ndarray, groups: list[str]) -> dict:
    out = {"all": float(acc.mean())}
    for j, g in enumerate(groups):
        out[g] = float(acc[gidx == j].mean()) if (gidx == j).any() else float("nan")
    return out


def simplex_grid(num: int, step: float) -> np.ndarray:
    """All weight vectors of length num with entries in multiples of `step` summing to 1."""
    n = round(1 / step)
    pts = [c for c in itertools.product(range(n + 1), repeat=num) if sum(c) == n]
    return np.array(pts, dtype=float) / n


def best_single_reward(train_rows: list[dict], cfg: ReviewsConfig, step: float = 0.05) -> np.ndarray:
    """Weights a (G,) of r = Σ a_g r_g maximising train accuracy (ties scored 0.5); first maximiser on the grid."""
    margins = reward_margins(train_rows, cfg)
    grid = simplex_grid(margins.shape[1], step)
    scores = margins @ grid.T  # (N, n_grid)
    acc = np.where(scores > 1e-12, 1.0, np.where(scores < -1e-12, 0.0, 0.5)).mean(0)
    return grid[int(np.argmax(acc))]


def _prompt_prior(rows: list[dict], cfg: ReviewsConfig, prior: np.ndarray) -> np.ndarray:
    """(N, G) π(x): the group implied by the prompt (contextual) or the global prior (multi)."""
    if cfg.task == "multi":
        return np.tile(prior, (len(rows), 1))
    groups = cfg.groups()
    out = np.zeros((len(rows), len(groups)))
    out[np.arange(len(rows)), [groups.index(r["domain"]) for r in rows]] = 1.0
    return out


def _argmax_hit(post: np.ndarray, gidx: np.ndarray) -> np.ndarray:
    """Per-row expected hit of argmax with uniform tie-breaking: 1/|argmax set| if the true group is in it."""
    best = post >= post.max(1, keepdims=True) - 1e-12
    return best[np.arange(len(gidx)), gidx] / best.sum(1)


def bayes_ceilings(train_rows: list[dict], test_rows: list[dict], cfg: ReviewsConfig) -> dict:
    """All ceilings of the module docstring on the test split (prior and single-reward weights from train)."""
    groups = cfg.groups()
    gtrain, gtest = _group_index(train_rows, cfg), _group_index(test_rows, cfg)
    prior = np.bincount(gtrain, minlength=len(groups)) / len(gtrain)
    p = chosen_probabilities(test_rows, cfg)  # (N, G)
    n = np.arange(len(test_rows))
    a = best_single_reward(train_rows, cfg)
    single = reward_margins(test_rows, cfg) @ a
    post_label = prior[None, :] * p  # the recorded label is "chosen wins": likelihood p_ig
    post_prompt = _prompt_prior(test_rows, cfg, prior)
    return {
        "groups": groups,
        "prior": prior.tolist(),
        "oracle_routed_accuracy": _by_group(decision_accuracy(p[n, gtest]), gtest, groups),
        "best_mixture_accuracy": _by_group(decision_accuracy(p @ prior), gtest, groups),
        "best_single_reward_accuracy": _by_group(decision_accuracy(0.5 + 0.5 * np.sign(single)), gtest, groups),
        "best_single_reward_weights": dict(zip(groups, a.tolist(), strict=True)),
        "oracle_recovery": float(_argmax_hit(post_label, gtest).mean()),
        "prompt_recovery": float(_argmax_hit(post_prompt, gtest).mean()),
        "chance_recovery": float(np.bincount(gtest, minlength=len(groups)).max() / len(gtest)),
        "disagreement": disagreement_matrix(test_rows, cfg).tolist(),
    }

