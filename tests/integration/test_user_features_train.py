"""`mixdpo train` with the gate on user features, then `evaluate` and `generate` for users the training data never
had: they are routed by their features (mixdpo_ds/model/user_features.py)."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from mixdpo_ds import cli
from mixdpo_ds.training.evaluate import recovery_accuracy
from mixdpo_ds.training.generate import generate

from .conftest import read_rows, synthetic_rows, train, train_rows

pytestmark = pytest.mark.integration

SPECS = [{"column": "pool", "kind": "categorical", "categories": ["A", "B"], "dim": 2},
         {"column": "country", "kind": "categorical", "categories": ["FR", "DE"], "dim": 2},
         {"column": "age", "kind": "numeric", "size": 1}]


def with_features(rows: list[dict], user_offset: int = 0) -> list[dict]:
    """The annotator pool decides the group (pos → A, neg → B); country and age are noise. user_offset renames
    the users (u0 → u{offset}), so evaluation users can be disjoint from the training users."""
    out = []
    for r in rows:
        k = int(r["user"][1:])
        out.append({**r, "user": f"u{k + user_offset}", "pool": "A" if r["group"] == "pos" else "B",
                    "country": ["FR", "DE"][k % 2], "age": float(20 + 7 * (k % 3))})
    return out


def test_feature_gate_routes_unseen_users(tiny_gpt2_dir, tmp_path):
    data, unseen = tmp_path / "train.jsonl", tmp_path / "unseen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in with_features(synthetic_rows())))
    unseen_rows = with_features(synthetic_rows(), user_offset=100)
    unseen.write_text("".join(json.dumps(r) + "\n" for r in unseen_rows))
    run = tmp_path / "run"
    rows = train(tiny_gpt2_dir, str(data), run, **{
        "experts.num_experts": 2, "experts.init_noise": 0.05, "gate.kind": "moe", "gate.features": "user_features",
        "gate.user_features": SPECS, "gate.lr": 0.05, "em.warmup_random_steps": 2, "train.max_steps": 12,
        "train.lr": 3e-3, "train.micro_batch_size": 8, "loss.beta": 0.5})
    assert len(train_rows(rows)) == 12
    gate = load_file(run / "export" / "gate" / "gate.safetensors")
    assert bool(gate["user_features.table_filled"]) and gate["net.weight"].abs().sum() > 0
    assert gate["user_features.table_categorical"][:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2]  # u0-u2 A, u3-u5 B, none

    out = tmp_path / "eval.jsonl"
    assert cli.main(["evaluate", "--run", str(run), "--data", str(unseen), "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["unknown_users"] == 48  # every evaluation user is new
    pairs = read_rows(out)
    w_argmax = [max(range(2), key=lambda k, r=r: r["w"][k]) for r in pairs]
    routing = recovery_accuracy(w_argmax, [r["group_id"] for r in pairs], K=2, G=2)["accuracy"]
    assert routing >= 0.9, summary

    # generate: a new user's features route them as evaluate does
    by_pool = {}
    for r, raw in zip(pairs, unseen_rows, strict=True):
        by_pool.setdefault(raw["pool"], r["w"])
    got = generate(str(run), "Review the movie:", route="top1", max_new_tokens=2, greedy=True,
                   user_features={"pool": "B", "country": "FR", "age": 20.0})
    assert got["expert"] == max(range(2), key=lambda k: by_pool["B"][k])
