"""`mixdpo evaluate`: per-pair posterior, gate weights, expert margins and mixture preference
(docs/ARCHITECTURE.md "Public surface").

    mixdpo evaluate --run runs/tiny --data tests/data/hh_rlhf_relabeled_sample.jsonl --out runs/tiny/eval.jsonl

Reads the run's resolved `config.yaml` and its `export/` (experts + gate), so it needs nothing from
training but the run directory and the base model (the reference). Writes one JSON line per pair:

    {"index", "group", "user", "resp": [K] posterior q, "w": [K] gate weights, "margins": [K] expert margins Δ_k,
     "p_mixture": P(chosen ≻ rejected) = Σ_k w_k sigmoid(Δ_k), "expert": argmax_k resp}

(plus `p_mixture_calibrated`, Σ_k w_k sigmoid(Δ_k / T_k), when the run has a `calibration.json` from
`mixdpo calibrate`, docs/math.md §13.2) and the summary `OUT.summary.json` (a `.jsonl` suffix of OUT is replaced:
eval.jsonl → eval.summary.json): accuracy (p_mixture > 0.5), `calibrated` (with a calibration: accuracy and ECE
of p_mixture before / after T), per-expert accuracies (Δ_k > 0), per-group accuracies
and, when the data has a group column, the best-permutation recovery accuracy of argmax resp: the share of
pairs whose argmax-resp expert is the one matched to their group under the best one-to-one matching of
experts to groups (exhaustive over permutations when max(K, #groups) ≤ 8; otherwise scipy's Hungarian
`linear_sum_assignment` when scipy is installed, else a greedy matching on the largest counts, which can
under-report; `method` in the summary says which).

Checks: the run and its export must exist (an error names the missing directory); data.max_length must fit the
model's positions; evaluation users the training data did not have are counted (`unknown_users` in the summary,
and a warning when the gate routes by user id: they take the population prior, the mean of the training users'
gate weights (docs/math.md §13.5); a gate on user features
routes every user by the features of the evaluated file, docs/ARCHITECTURE.md "User features"); for a gate that
routes by user, `gate_evidence` in the summary (and a warning) names the users whose own pairs favour another
expert than the gate's (a gate locked into a wrong assignment, docs/math.md §14); pairs whose
expert margins or gate weights are not finite (NaN / inf) make the evaluation fail with `NonFiniteError` after OUT
and the summary (with `non_finite`) are written — their accuracy would read as a silent 0.
"""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import torch

from mixdpo_ds.core.losses import mixdpo_loss
from mixdpo_ds.core.personalize import (
    decision_accuracy,
    expected_calibration_error,
    mixture_probability,
    user_log_posterior,
)
from mixdpo_ds.training.batch import MODEL_KEYS, as_pairs, chosen_prompt_features, collate
from mixdpo_ds.training.build import reference_paths
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.data import check_lengths, load_preference_data

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"  # `mixdpo calibrate`'s margin temperature (docs/math.md §13.2)


class NonFiniteError(RuntimeError):
    """Some pairs had NaN / inf margins or gate weights: the accuracies of the summary are meaningless."""

    def __init__(self, message: str, summary_path: str):
        super().__init__(message)
        self.summary_path = summary_path


def best_matching(confusion: list[list[int]]) -> tuple[int, dict[int, int], str]:
    """Max Σ confusion[k][g] over one-to-one matchings of rows k (experts) to columns g (groups).

    Returns (matched count, {group: expert}, method). Exhaustive for max(K, G) ≤ 8 (8! = 40320 permutations).
    """
    K, G = len(confusion), len(confusion[0]) if confusion else 0
    S = max(K, G)
    C = [[confusion[k][g] if k < K and g < G else 0 for g in range(S)] for k in range(S)]  # square, zero-padded
    if S <= 8:
        best, perm = max((sum(C[p[g]][g] for g in range(S)), p) for p in itertools.permutations(range(S)))
        method = "permutations"
    else:
        try:
            from scipy.optimize import linear_sum_assignment

            rows, cols = linear_sum_assignment(torch.tensor(C).numpy(), maximize=True)
            perm = [0] * S
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                perm[c] = r
            best, method = sum(C[perm[g]][g] for g in range(S)), "hungarian"
        except ImportError:
            perm, used_k, used_g = [None] * S, set(), set()
            for _count, k, g in sorted(((C[k][g], k, g) for k in range(S) for g in range(S)), reverse=True):
                if k not in used_k and g not in used_g:
                    perm[g] = k
                    used_k.add(k)
                    used_g.add(g)
            best, method = sum(C[perm[g]][g] for g in range(S)), "greedy"
    mapping = {g: perm[g] for g in range(G) if perm[g] < K}
    return best, mapping, method


def recovery_accuracy(expert: list[int], group: list[int], K: int, G: int) -> dict:
    """Best-permutation accuracy of predicted experts against group ids (pairs with group -1 ignored)."""
    pairs = [(e, g) for e, g in zip(expert, group, strict=True) if g >= 0]
    confusion = [[0] * G for _ in range(K)]
    for e, g in pairs:
        confusion[e][g] += 1
    matched, mapping, method = best_matching(confusion)
    return {"accuracy": matched / max(1, len(pairs)), "n": len(pairs), "mapping": mapping, "method": method,
            "confusion": confusion}


def _load_run(run_dir: Path, device: torch.device):
    from mixdpo_ds.training.export import has_compact, load_compact, load_experts, load_export_gate, run_export_dir

    export = run_export_dir(str(run_dir))
    policy = load_compact(str(export)) if has_compact(export) else load_experts(str(export))
    gate, meta = load_export_gate(str(export))
    return policy.to(device).eval(), (gate.to(device).eval() if gate is not None else None), meta or {}


def _eval_user_features(gate, cfg, data_path: str) -> dict | None:
    """{user: feature values} of the evaluated file when the gate routes by user features (None otherwise): every
    user, seen in training or not, is routed by the features this file gives."""
    if gate is None or not getattr(gate.cfg, "uses_user_features", False):
        return None
    from mixdpo_ds.training.user_features import feature_columns, read_user_features

    return read_user_features(data_path, cfg.data.user_column, feature_columns(gate.cfg), cfg.data.split)


@torch.no_grad()
def score_pairs(run_dir: str, data_path: str, group_column: str | None = None, batch_size: int = 8,
                overrides: list[str] | None = None) -> dict:
    """The per-pair rows of `evaluate_run` without writing anything: {"rows", "K", "group_names", "unknown_users",
    "non_finite"}. Each row also has `user` (the data's user value, or None)."""
    from transformers import AutoTokenizer

    from mixdpo_ds.model.reference import FrozenReference
    from mixdpo_ds.training.export import export_model_config, export_tokenizer_dir, run_export_dir

    run = Path(run_dir)
    export = run_export_dir(run_dir)  # before any from_pretrained: a missing export would become a hub lookup
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run / 'config.yaml'} not found: {run} is not the output_dir of `mixdpo train`")
    data_over = [f"data.path={data_path}", "data.eval_fraction=0.0", "data.eval_path=null", "data.eval_split=null",
                 "data.split=train", "data.max_rows=null", "train.resume_from=null"]
    if group_column is not None:
        data_over.append(f"data.group_column={group_column}")
    cfg = load_config(run / "config.yaml", data_over + list(overrides or []))
    check_lengths(export_model_config(export), cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(export_tokenizer_dir(export)))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = load_preference_data(cfg.data, tokenizer)
    policy, gate, meta = _load_run(run, device)
    K = policy.num_experts
    ex = cfg.experts
    reference = FrozenReference(reference_paths(cfg), logprob_impl=ex.logprob_impl, chunk_size=ex.chunk_size).to(device)
    phase = cfg.em.schedule(cfg.loss.beta).at(1.0)  # the weights in force at the end of training
    beta = phase.beta if phase.beta is not None else cfg.loss.beta

    # The gate's user ids are the training data's; map this file's users through their names.
    train_users = (meta.get("user_vocab") or {})
    user_map = {i: train_users.get(name, -1) for name, i in data.user_vocab.items()}
    user_names = {i: name for name, i in data.user_vocab.items()}
    unknown = [e for e in data.train if e["user"] >= 0 and user_map[e["user"]] < 0]
    by_features = _eval_user_features(gate, cfg, data_path)  # {user: features}, or None without user features
    population = bool(unknown) and by_features is None and getattr(gate, "has_population_prior", False)
    if unknown and by_features is not None:
        log.info("evaluate: %d of %d pairs have a user the training data did not have; the gate routes them by "
                 "their features (gate.user_features)", len(unknown), len(data.train))
    elif unknown and gate is not None and getattr(gate.cfg, "uses_user", False):
        names = sorted({name for name, i in data.user_vocab.items() if user_map[i] < 0})
        how = (f"the population prior, the mean of the {len(train_users)} training users' gate weights "
               "(docs/math.md §13.5)") if population else "the shared no-user row (the training data had no users)"
        log.warning("evaluate: %d of %d pairs have a user the training data did not have (%d users, e.g. %s); the "
                    "gate routes them by %s", len(unknown), len(data.train), len(names),
                    ", ".join(repr(n) for n in names[:5]), how)
    group_names = {i: name for name, i in data.group_vocab.items()}
    rows, examples = [], data.train
    non_finite = {"margins": 0, "w": 0}  # pairs with a NaN / inf expert margin, gate weight
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
        B = batch["index"].shape[0]
        out = policy(**{k: batch[k].to(device) for k in MODEL_KEYS})  # logps (2B, K)
        ref = as_pairs(reference.logps(batch).to(device), B)  # (B, 2) or (B, 2, K)
        users = torch.tensor([user_map.get(int(u), -1) for u in batch["user_ids"]], device=device)
        feats = chosen_prompt_features(out, B)
        encoded = None if by_features is None else gate.user_features.encode(
            [by_features.get(user_names.get(int(u))) for u in batch["user_ids"]])
        log_w = gate(feats, users, batch_size=B, **({"user_features": encoded} if encoded is not None else {})) \
            if gate is not None else torch.full((B, K), -torch.log(
            torch.tensor(float(K))).item(), device=device)
        unseen = (users < 0) & (batch["user_ids"].to(device) >= 0)  # a user value the training data did not have
        if population and unseen.any():
            log_w = torch.where(unseen[:, None], gate.population_log_w(feats, B), log_w)
        res = mixdpo_loss(as_pairs(out.logps, B), ref, log_w, beta, posterior_correction=cfg.em.posterior_correction,
                          estep=phase.estep, mode="exact")
        w = log_w.exp()  # (B, K)
        p_mix = (w * torch.sigmoid(res.margins)).sum(-1)  # (B,) P_i = Σ_k w_ik σ(Δ_ik)
        bad_margin = ~torch.isfinite(res.margins).all(-1)  # (B,)
        bad_w = ~torch.isfinite(w).all(-1)
        for i in range(B):
            g = int(batch["group_ids"][i])
            rows.append({"index": int(batch["index"][i]), "group": group_names.get(g) if g >= 0 else None,
                         "group_id": g, "user": user_names.get(int(batch["user_ids"][i])),
                         "resp": res.resp[i].tolist(), "w": w[i].tolist(),
                         "margins": res.margins[i].tolist(), "p_mixture": float(p_mix[i]),
                         "loglik": float(res.loglik[i]), "expert": int(res.resp[i].argmax())})
            non_finite["margins"] += int(bad_margin[i])
            non_finite["w"] += int(bad_w[i])
    return {"rows": rows, "K": K, "group_names": group_names, "unknown_users": len(unknown),
            "non_finite": non_finite, "routes_by_user": gate is not None and getattr(gate.cfg, "uses_user", False)}


def gate_evidence(rows: list[dict], min_pairs: int = 5) -> dict:
    """Users whose own pairs outvote the gate: for each user with ≥ min_pairs rows, the posterior over experts from
    all their pairs (`core.personalize.user_log_posterior`, T = 1: the few-shot posterior of docs/math.md §13.1 with
    the prior w̄_u, the mean gate weight on the user's rows, as `mixdpo personalize`), against the gate's argmax w̄_u
    where the gate commits (w̄_uk > ½). A disagreement means the experts fit that user better elsewhere than the
    gate routes them: the wrong-assignment lock-in of docs/math.md §12 / §14, which no collapse detector sees.
    `mixdpo personalize` on those users' pairs fixes their routing; retraining with `gate.hold_steps` avoids it."""
    by_user: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("user") is not None:
            by_user.setdefault(str(r["user"]), []).append(r)
    checked, disagree = 0, []
    for user, rs in sorted(by_user.items()):
        if len(rs) < min_pairs:
            continue
        checked += 1
        prior = torch.tensor([r["w"] for r in rs], dtype=torch.float64).mean(0).clamp_min(1e-300).log()  # (K,)
        log_q = user_log_posterior(prior, torch.tensor([r["margins"] for r in rs], dtype=torch.float64))  # (K,)
        gate_k, post_k = int(prior.argmax()), int(log_q.argmax())
        if post_k != gate_k and prior[gate_k].exp() > 0.5:  # a gate that commits (w̄ > ½), not one still hedging
            ratio = (log_q[post_k] - log_q[gate_k]) - (prior[post_k] - prior[gate_k])  # Σ_i log σ(Δ) difference
            disagree.append({"user": user, "pairs": len(rs), "gate_expert": gate_k, "posterior_expert": post_k,
                             "log_likelihood_ratio": float(ratio)})
    return {"min_pairs": min_pairs, "users_checked": checked, "users_disagreeing": len(disagree),
            "disagreements": disagree}


def evaluate_run(run_dir: str, data_path: str, out_path: str, group_column: str | None = None, batch_size: int = 8,
                 overrides: list[str] | None = None) -> dict:
    """Write OUT (JSONL per pair) and OUT.summary.json; return the summary dict (plus `summary_path`)."""
    scored = score_pairs(run_dir, data_path, group_column, batch_size, overrides)
    rows, K, non_finite = scored["rows"], scored["K"], scored["non_finite"]
    calibrated = add_calibrated(run_dir, rows) if not any(non_finite.values()) else None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    summary = summarize(rows, K, scored["group_names"])
    summary["unknown_users"] = scored["unknown_users"]  # pairs whose user the training data did not have
    if scored["routes_by_user"]:
        ev = summary["gate_evidence"] = gate_evidence(rows)
        if ev["users_disagreeing"]:
            log.warning("evaluate: for %d of %d users (≥ %d pairs each) their own pairs favour another expert than "
                        "the gate routes them to (e.g. %s); the gate is locked into a wrong assignment for them "
                        "(docs/math.md §14). `mixdpo personalize` on their pairs re-routes them; a retrain with "
                        "gate.hold_steps avoids it", ev["users_disagreeing"], ev["users_checked"], ev["min_pairs"],
                        ", ".join(f"{d['user']!r}: expert {d['gate_expert']} → {d['posterior_expert']}"
                                  for d in ev["disagreements"][:5]))
    if calibrated is not None:
        summary["calibrated"] = calibrated
    if any(non_finite.values()):
        summary["non_finite"] = non_finite
    summary_path = out_path.with_name(out_path.name + ".summary.json") if out_path.suffix != ".jsonl" else \
        out_path.with_suffix(".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2))
    if any(non_finite.values()):
        what = [f"{n} of {len(rows)} pairs have non-finite (NaN/inf) {name}"
                for name, n in (("expert margins", non_finite["margins"]), ("gate weights", non_finite["w"])) if n]
        raise NonFiniteError(f"evaluate: {'; '.join(what)}: the model, reference or gate produced NaN/inf, so the "
                             f"accuracies are meaningless (per-pair rows: {out_path}, summary: {summary_path})",
                             str(summary_path))
    return {**summary, "summary_path": str(summary_path)}


def _accuracies(rows: list[dict], K: int) -> dict:
    n = max(1, len(rows))
    return {"n": len(rows), "accuracy": sum(r["p_mixture"] > 0.5 for r in rows) / n,
            "expert_accuracy": [sum(r["margins"][k] > 0 for r in rows) / n for k in range(K)],
            "resp_mean": [sum(r["resp"][k] for r in rows) / n for k in range(K)]}


def summarize(rows: list[dict], K: int, group_names: dict[int, str]) -> dict:
    """Mixture / per-expert / per-group accuracies and, with groups, the best-permutation recovery accuracy."""
    summary = {"num_experts": K, **_accuracies(rows, K),
               "w_mean": [sum(r["w"][k] for r in rows) / max(1, len(rows)) for k in range(K)],
               "mbt_loglik": sum(r["loglik"] for r in rows) / max(1, len(rows))}
    grouped = [r for r in rows if r["group_id"] >= 0]
    if grouped:
        summary["per_group"] = {name: _accuracies([r for r in grouped if r["group_id"] == g], K)
                                for g, name in sorted(group_names.items())}
        rec = recovery_accuracy([r["expert"] for r in grouped], [r["group_id"] for r in grouped], K,
                                len(group_names))
        rec["mapping"] = {group_names[g]: k for g, k in rec["mapping"].items()}
        summary["recovery"] = rec
        summary["recovery_accuracy"] = rec["accuracy"]
    return summary


def run_temperature(run_dir: str, temperature: str | float | list[float] = "run") -> list[float]:
    """The temperature to use: "run" = DIR/calibration.json's (1 when the run has none), or the given value(s)."""
    if temperature != "run":
        return [float(temperature)] if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return [1.0]
    return [float(t) for t in json.loads(path.read_text())["temperature"]]


def add_calibrated(run_dir: str, rows: list[dict]) -> dict | None:
    """With DIR/calibration.json: adds `p_mixture_calibrated` to every row and returns the accuracy and ECE of
    p_mixture before and after T (None without a calibration, or without rows)."""
    if not rows or not (Path(run_dir) / CALIBRATION_FILE).is_file():
        return None
    temp = run_temperature(run_dir)
    w = torch.tensor([r["w"] for r in rows], dtype=torch.float64)
    log_w, margins = w.clamp_min(1e-300).log(), torch.tensor([r["margins"] for r in rows], dtype=torch.float64)
    p_raw = mixture_probability(log_w, margins)
    p_cal = mixture_probability(log_w, margins, torch.tensor(temp, dtype=torch.float64))
    for r, p in zip(rows, p_cal.tolist(), strict=True):
        r["p_mixture_calibrated"] = p
    return {"temperature": temp, "ece_before": expected_calibration_error(p_raw),
            "ece_after": expected_calibration_error(p_cal), "accuracy_before": float(decision_accuracy(p_raw).mean()),
            "accuracy_after": float(decision_accuracy(p_cal).mean())}
