"""Few-shot personalisation of a trained run (docs/math.md §13): `mixdpo calibrate`, `mixdpo personalize`, the
user-weight store `generate --user` routes with, and the few-shot curve of `mixdpo evaluate --few-shot`.

    mixdpo calibrate   --run runs/mix --data heldout.jsonl [--per-expert]      # DIR/calibration.json
    mixdpo personalize --run runs/mix --pairs user.jsonl [--user ID]           # DIR/user_weights.json
    mixdpo generate    --run runs/mix --prompt "review of x :" --user ID       # routes with the stored weights
    mixdpo evaluate    --run runs/mix --data test.jsonl --out e.jsonl --few-shot 0,1,3,5,10,20

Python: `user_weights(run_dir, pairs)` → the K weights of one user from their labelled pairs (a file or a list of
rows with prompt / chosen / rejected).

The posterior q_k ∝ w_k Π_i σ(Δ_ik / T_k) (`core.personalize.user_posterior`) uses as its prior w the run's gate
weights averaged over the user's pairs (Mix-DPO: exactly the global w) and the run's calibration temperature T
(`calibration.json`, written by `calibrate`; T = 1 without one). No retraining and no user metadata at training time.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from mixdpo_ds.core.personalize import (
    decision_accuracy,
    expected_calibration_error,
    fit_temperature,
    mixture_nll,
    mixture_probability,
    user_posterior,
)
from mixdpo_ds.training.evaluate import CALIBRATION_FILE, run_temperature

log = logging.getLogger(__name__)

USER_STORE = "user_weights.json"


# ------------------------------------------------------------------------------------------- calibration
def _tensors(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log w (B, K), margins Δ (B, K)) of evaluate's per-pair rows."""
    w = torch.tensor([r["w"] for r in rows], dtype=torch.float64)
    return w.clamp_min(1e-300).log(), torch.tensor([r["margins"] for r in rows], dtype=torch.float64)


def _user_index(rows: list[dict]) -> torch.Tensor | None:
    """(B,) user ids 0..U-1 of the rows (a row without a user is a user of its own), None when no row has one."""
    if not any(r.get("user") is not None for r in rows):
        return None
    ids: dict = {}
    return torch.tensor([ids.setdefault(r.get("user") if r.get("user") is not None else ("row", i), len(ids))
                         for i, r in enumerate(rows)])


def calibration_report(rows: list[dict], per_expert: bool = False, by_user: bool | None = None) -> dict:
    """Fit T on these rows (§13.2) and report NLL, ECE and accuracy of p_mixture before (T = 1) and after.

    by_user (None: when the rows have users): fit the per-user evidence (`user_mixture_nll`, the likelihood of the
    few-shot posterior) instead of the per-pair mixture likelihood."""
    if not rows:
        raise ValueError("calibration: no pairs to fit the temperature on")
    log_w, margins = _tensors(rows)
    users = _user_index(rows) if by_user is not False else None
    if by_user and users is None:
        raise ValueError("calibration by user: the pairs have no user column")
    t = fit_temperature(log_w, margins, per_expert=per_expert, users=users).double()
    out = {"temperature": t.tolist(), "per_expert": per_expert, "n": len(rows),
           "likelihood": "per user" if users is not None else "per pair"}
    for name, temp in (("before", 1.0), ("after", t)):
        p = mixture_probability(log_w, margins, temp)
        out[f"nll_{name}"] = float(mixture_nll(log_w, margins, temp))
        out[f"ece_{name}"] = expected_calibration_error(p)
        out[f"accuracy_{name}"] = float(decision_accuracy(p).mean())
    return out


def calibrate(run_dir: str, data_path: str, per_expert: bool = False, batch_size: int = 8,
              overrides: list[str] | None = None, by_user: bool | None = None) -> dict:
    """Fit the run's margin temperature on held-out pairs and write DIR/calibration.json; returns the report."""
    from mixdpo_ds.training.evaluate import score_pairs

    report = calibration_report(score_pairs(run_dir, data_path, batch_size=batch_size, overrides=overrides)["rows"],
                                per_expert, by_user)
    report["data"] = str(data_path)
    path = Path(run_dir) / CALIBRATION_FILE
    path.write_text(json.dumps(report, indent=2))
    return {**report, "path": str(path)}


# ------------------------------------------------------------------------------------------- one user's weights
def posterior_weights(rows: list[dict], temperature: float | list[float] = 1.0) -> list[float]:
    """q (K,) of one user from evaluate's rows of their pairs: prior = log of the mean gate weight over the rows."""
    log_w, margins = _tensors(rows)
    prior = torch.logsumexp(log_w, 0) - math.log(len(rows))  # log mean_i w_i
    return user_posterior(prior, margins, torch.tensor(temperature, dtype=torch.float64)).tolist()


def _score(run_dir: str, pairs, batch_size: int) -> list[dict]:
    """evaluate's rows of `pairs`: a data file, or a list of row dicts (written to a temporary JSONL)."""
    from mixdpo_ds.training.evaluate import score_pairs

    if isinstance(pairs, (str, os.PathLike)):
        return score_pairs(run_dir, str(pairs), batch_size=batch_size)["rows"]
    pairs = list(pairs)
    if not pairs:
        raise ValueError("user_weights: no pairs given")
    with tempfile.TemporaryDirectory(prefix="mixdpo_pairs_") as tmp:
        path = os.path.join(tmp, "pairs.jsonl")
        with open(path, "w") as f:
            for row in pairs:
                f.write(json.dumps(row) + "\n")
        return score_pairs(run_dir, path, batch_size=batch_size)["rows"]


def user_weights(run_dir: str, pairs, temperature: str | float | list[float] = "run",
                 batch_size: int = 8) -> list[float]:
    """The K gate weights of one user from their labelled pairs (all of `pairs` are that user's): the posterior
    q_k ∝ w_k Π_i σ(Δ_ik / T_k) (docs/math.md §13.1). `pairs`: a data file or a list of rows."""
    return posterior_weights(_score(run_dir, pairs, batch_size), run_temperature(run_dir, temperature))


def load_user_store(run_dir: str) -> dict:
    """DIR/user_weights.json as {"temperature": [...], "users": {id: {"w", "n_pairs", "source"}}} (empty if none)."""
    path = Path(run_dir) / USER_STORE
    return json.loads(path.read_text()) if path.is_file() else {"users": {}}


def personalize(run_dir: str, pairs_path: str, user: str | None = None,
                temperature: str | float | list[float] = "run", batch_size: int = 8, store: bool = True) -> dict:
    """Weights for every user of `pairs_path` (or for `user` alone) into the run's user-weight store.

    With --user: that user's rows when the file has a user column, else all rows are that user's. Without: one
    entry per user of the user column (a file without one is an error). Returns {"users": {id: entry}, "store"}.
    """
    rows = _score(run_dir, pairs_path, batch_size)
    temp = run_temperature(run_dir, temperature)
    has_users = any(r.get("user") is not None for r in rows)
    if user is not None:
        mine = [r for r in rows if r.get("user") == str(user)] if has_users else rows
        if not mine:
            known = sorted({r["user"] for r in rows if r.get("user") is not None})
            raise ValueError(f"--user {user!r}: no pair of {pairs_path} has that user (its users: "
                             f"{', '.join(map(repr, known[:5]))}{', …' if len(known) > 5 else ''})")
        by_user = {str(user): mine}
    elif has_users:
        by_user = {}
        for r in rows:
            if r.get("user") is not None:
                by_user.setdefault(r["user"], []).append(r)
    else:
        raise ValueError(f"{pairs_path} has no user column: pass --user ID to name the user these pairs belong to")
    entries = {u: {"w": posterior_weights(rs, temp), "n_pairs": len(rs), "source": str(pairs_path)}
               for u, rs in by_user.items()}
    result = {"users": entries, "temperature": temp}
    if store:
        saved = load_user_store(run_dir)
        saved["users"].update(entries)
        saved["temperature"] = temp
        path = Path(run_dir) / USER_STORE
        path.write_text(json.dumps(saved, indent=1))
        result["store"] = str(path)
    return result


# ------------------------------------------------------------------------------------------- the few-shot curve
def matched_experts(rows: list[dict]) -> dict[int, int] | None:
    """group id → its matched expert (best-permutation matching of argmax resp over all of `rows`' groups, as
    evaluate's recovery); None without a group column."""
    from mixdpo_ds.training.evaluate import recovery_accuracy

    grouped = [r for r in rows if r.get("group_id", -1) >= 0]
    if not grouped:
        return None
    K, G = len(grouped[0]["margins"]), 1 + max(r["group_id"] for r in grouped)
    return recovery_accuracy([r["expert"] for r in grouped], [r["group_id"] for r in grouped], K, G)["mapping"]


def _crossfit_temperatures(by_user: dict[str, list[dict]], per_expert: bool) -> dict[str, torch.Tensor]:
    """Per user: T fitted (per-user evidence) on the pairs of the users in the other half (users split in two folds
    by sorted id), so no user's own pairs calibrate their posterior."""
    users = sorted(by_user)
    folds = [users[0::2], users[1::2]]
    temps = {}
    for f, fold in enumerate(folds):
        other = [r for u in folds[1 - f] for r in by_user[u]] or [r for u in fold for r in by_user[u]]
        log_w, margins = _tensors(other)
        t = fit_temperature(log_w, margins, per_expert=per_expert, users=_user_index(other)).double()
        temps.update({u: t for u in fold})
    return temps


def _hit(x: float, tie: float) -> float:
    return float(x > tie) + 0.5 * (x == tie)


def _one_draw(rs: list[dict], margins: torch.Tensor, prior: torch.Tensor, order: np.ndarray, shots: list[int],
              temp: torch.Tensor, k_true: int | None, dpo: dict | None, acc: dict, routing: dict, base: dict) -> None:
    """One context draw of one user: appends the query hits of every N (raw and calibrated) and of the baselines."""
    query = torch.as_tensor(order[shots[-1]:])
    base["global_mixture"] += [_hit(rs[i]["p_mixture"], 0.5) for i in query.tolist()]
    if dpo is not None:
        base["dpo"] += [_hit(dpo[rs[i]["index"]], 0.0) for i in query.tolist()]
    if k_true is not None:
        base["oracle_routed"] += decision_accuracy(torch.sigmoid(margins[query, k_true])).tolist()
    for j, n in enumerate(shots):
        ctx = torch.as_tensor(order[:n], dtype=torch.long)
        for name, t in (("raw", torch.ones(1, dtype=torch.float64)), ("calibrated", temp)):
            q = user_posterior(prior, margins[ctx], t)
            acc[name][j] += decision_accuracy(mixture_probability(q.log(), margins[query], t)).tolist()
            if k_true is not None:
                routing[name][j].append(float(int(q.argmax()) == k_true))


def few_shot_curve(rows: list[dict], shots: list[int], repeats: int = 5, seed: int = 0,
                   temperature: list[float] | None = None, per_expert: bool = False,
                   dpo_rows: list[dict] | None = None, oracle_experts: dict[int, int] | None = None) -> dict:
    """Per user: N of their pairs as context, accuracy on the rest, for each N in `shots` (docs/math.md §13.4).

    Per user and repeat, one random order of the user's pairs: the first N are the context, the pairs after the
    first max(shots) the query set, the same for every N (users with ≤ max(shots) pairs are skipped). Accuracy of
    p = Σ_k q_k σ(Δ_k / T) on the query pairs, pooled over users and repeats, with T = 1 ("raw") and calibrated
    ("calibrated": `temperature`, or cross-fitted over two folds of users when None); next to it on the same
    query pairs: the global mixture (evaluate's p_mixture), DPO (`dpo_rows`: the same data scored by a K = 1 run)
    and, with a group column, the oracle-routed accuracy (each user's group's matched expert, Δ > 0) and the
    share of users whose argmax q is that expert ("routing"). `oracle_experts` (group id → expert) gives the
    matching when `rows` are a subset (one group's users): matched on the subset alone, it would be arbitrary.
    """
    shots = sorted(set(int(n) for n in shots))
    if not shots or shots[0] < 0:
        raise ValueError(f"--few-shot: N values must be >= 0, got {shots}")
    by_user: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("user") is not None:
            by_user.setdefault(r["user"], []).append(r)
    if not by_user:
        raise ValueError("few-shot evaluation needs a user column in the data (which pairs belong to one user)")
    need = shots[-1] + 1
    skipped = sorted(u for u, rs in by_user.items() if len(rs) < need)
    by_user = {u: rs for u, rs in by_user.items() if len(rs) >= need}
    if not by_user:
        raise ValueError(f"few-shot: no user has more than max(N) = {shots[-1]} pairs (users: {len(skipped)})")
    temps = ({u: torch.tensor(temperature, dtype=torch.float64) for u in by_user} if temperature is not None
             else _crossfit_temperatures(by_user, per_expert))
    oracle = oracle_experts if oracle_experts is not None else matched_experts(rows)
    dpo = {r["index"]: r["margins"][0] for r in dpo_rows} if dpo_rows is not None else None
    rng = np.random.default_rng(seed)
    acc = {"raw": [[] for _ in shots], "calibrated": [[] for _ in shots]}
    routing = {"raw": [[] for _ in shots], "calibrated": [[] for _ in shots]}
    base = {"global_mixture": [], "dpo": [], "oracle_routed": []}
    for u in sorted(by_user):
        rs = by_user[u]
        log_w, margins = _tensors(rs)
        prior = torch.logsumexp(log_w, 0) - math.log(len(rs))
        groups = [r["group_id"] for r in rs if r.get("group_id", -1) >= 0]
        k_true = oracle.get(max(set(groups), key=groups.count)) if oracle and groups else None
        for _ in range(repeats):
            _one_draw(rs, margins, prior, rng.permutation(len(rs)), shots, temps[u], k_true, dpo, acc, routing, base)
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"shots": shots, "users": len(by_user), "skipped_users": len(skipped), "repeats": repeats,
            "query_pairs": len(base["global_mixture"]) // repeats,
            "temperature": (temperature if temperature is not None else "cross-fitted over two folds of users"),
            "accuracy": {name: [mean(a) for a in v] for name, v in acc.items()},
            "routing": {name: [mean(a) for a in v] for name, v in routing.items()} if oracle else None,
            **{name: mean(v) for name, v in base.items()}}


def format_curve(curve: dict) -> str:
    """The few-shot curve as a text table (the CLI's output)."""
    lines = [f"few-shot: {curve['users']} users ({curve['skipped_users']} with too few pairs skipped), "
             f"{curve['query_pairs']} query pairs x {curve['repeats']} repeats",
             "N      " + " ".join(f"{n:>7d}" for n in curve["shots"])]
    for name in ("raw", "calibrated"):
        lines.append(f"{name:<7}" + " ".join(f"{a:7.4f}" for a in curve["accuracy"][name]))
    for name in ("global_mixture", "dpo", "oracle_routed"):
        if curve[name] is not None:
            lines.append(f"{name}: {curve[name]:.4f}")
    return "\n".join(lines)

