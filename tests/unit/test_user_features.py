"""Gates on user features (mixdpo_ds/model/user_features.py, training/user_features.py): encoders, config errors,
the feature table, save/load, and routing of users the gate never saw."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mixdpo_ds.model.gating import GateConfig, MoEGate, load_gate, pretrain_gate, save_gate
from mixdpo_ds.model.user_features import UserFeatureEncoder, UserFeatureSpec
from mixdpo_ds.training.user_features import read_user_features

SPECS = [{"column": "pool", "kind": "categorical", "categories": ["a", "b", "c"], "dim": 3},
         {"column": "country", "kind": "categorical", "categories": ["FR", "DE", "US", "JP"], "dim": 2},
         {"column": "profile", "kind": "numeric", "size": 2}]


def synthetic_users(n_per_group: int, seed: int, start: int = 0, p_pool: float = 1.0) -> list[dict]:
    """Users of 3 groups whose features decide the group: the pool is the group's (with probability p_pool, else a
    random pool), the 2-d profile is the group's centroid + N(0, 0.3²) noise (centroids 2 apart), the country is
    noise."""
    rng = np.random.default_rng(seed)
    centroids = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    users = []
    for g in range(3):
        for u in range(n_per_group):
            pool = "abc"[g] if rng.random() < p_pool else "abc"[int(rng.integers(3))]
            users.append({"user": f"g{g}_{start + u}", "group": g, "pool": pool,
                          "country": ["FR", "DE", "US", "JP"][int(rng.integers(4))],
                          "profile": (centroids[g] + rng.normal(0, 0.3, 2)).round(3).tolist()})
    return users


def test_spec_and_config_errors():
    with pytest.raises(ValueError, match=r"gate.user_features\['pool'\].categories is empty"):
        UserFeatureSpec(column="pool")
    with pytest.raises(ValueError, match=r"kind='text': allowed \('categorical', 'numeric'\)"):
        UserFeatureSpec(column="x", kind="text")
    with pytest.raises(ValueError, match="needs gate.user_features"):
        GateConfig(kind="moe", features="prompt+user_features")
    with pytest.raises(ValueError, match="each column once"):
        GateConfig(kind="moe", features="user_features", user_features=[SPECS[0], SPECS[0]])
    cfg = GateConfig(kind="moe", features="prompt+user_features", user_features=SPECS)
    assert cfg.uses_user and cfg.uses_user_features and not cfg.uses_user_embedding and cfg.uses_prompt
    assert GateConfig(kind="moe", features="prompt+user").uses_user_embedding


def test_encoder_by_hand():
    """pool 'b' → index 1, an unknown pool 'z' and a missing one → the 'other' row 3; numeric as given; None (no
    user) → every categorical 'other' and zeros. Width = 3 + 2 + 2 = 7."""
    enc = UserFeatureEncoder(SPECS, num_users=2)
    cat, num = enc.encode([{"pool": "b", "country": "JP", "profile": [1.5, -2]},
                           {"pool": "z", "profile": [0, 1]}, None])
    assert cat.tolist() == [[1, 3], [3, 4], [3, 4]] and num.tolist() == [[1.5, -2.0], [0.0, 1.0], [0.0, 0.0]]
    assert enc.width == 7 and enc((cat, num) and None, (cat, num)).shape == (3, 7)
    with pytest.raises(ValueError, match=r"numeric with size 2, but a user has profile=\[1\.0\] \(user 'u7'\)"):
        enc.encode([{"user": "u7", "pool": "a", "profile": [1.0]}])
    with pytest.raises(RuntimeError, match="user feature table is empty"):
        enc(torch.tensor([0]))


def _gate(num_users: int, features: str = "user_features") -> MoEGate:
    cfg = GateConfig(kind="moe", features=features, user_features=SPECS, arch="linear", w_min=0.0)
    torch.manual_seed(0)
    return MoEGate(cfg, num_experts=3, hidden_size=8, num_users=num_users)


def _routing(pred: torch.Tensor, groups: list[int]) -> float:
    """Best-permutation accuracy over the 3! matchings of experts to groups."""
    import itertools

    g = torch.tensor(groups)
    return max(float((torch.tensor(p)[pred] == g).float().mean()) for p in itertools.permutations(range(3)))


def test_unseen_users_are_routed_by_their_features(tmp_path):
    """Train the gate (supervised on the group, `pretrain_gate`) on 30 users; 60 other users, never seen, are routed
    from their features alone: ≥ 0.9 (the profile separates the groups). An id-embedding gate gives every unseen
    user its one shared row, so it routes them all to one expert (1/3). Survives save / load."""
    train, test = synthetic_users(10, seed=0), synthetic_users(20, seed=1, start=100)
    assert not {u["user"] for u in train} & {u["user"] for u in test}
    gate = _gate(len(train))
    gate.user_features.set_table(train)
    labels = torch.tensor([u["group"] for u in train])
    acc = pretrain_gate(gate, None, labels, steps=300, lr=0.05, user_ids=torch.arange(len(train)))
    assert acc == 1.0
    with torch.no_grad():
        pred = gate(None, torch.full((len(test),), -1), user_features=gate.user_features.encode(test)).argmax(-1)
    assert _routing(pred, [u["group"] for u in test]) >= 0.9
    save_gate(gate, gate.cfg, str(tmp_path / "g"))
    again = load_gate(str(tmp_path / "g"))
    with torch.no_grad():
        assert torch.equal(again(None, torch.arange(len(train))), gate(None, torch.arange(len(train))))
    ids = _gate(len(train), features="user")
    pretrain_gate(ids, None, labels, steps=300, lr=0.05, user_ids=torch.arange(len(train)))
    with torch.no_grad():
        pred_ids = ids(None, torch.full((len(test),), -1)).argmax(-1)
    assert pred_ids.unique().numel() == 1 and _routing(pred_ids, [u["group"] for u in test]) == pytest.approx(1 / 3)


def test_read_user_features_checks_consistency(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "user": "u1", "pool": "a", "profile": [0, 1]},
            {"prompt": "p", "chosen": "c", "rejected": "d", "user": "u1", "pool": "a", "profile": [0, 1]},
            {"prompt": "p", "chosen": "e", "rejected": "f", "user": "u2", "pool": "b", "profile": [1, 1]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_user_features(str(path), "user", ["pool", "profile"])
    assert got == {"u1": {"pool": "a", "profile": [0, 1]}, "u2": {"pool": "b", "profile": [1, 1]}}
    with pytest.raises(ValueError, match=r"column\(s\) \['age'\] not found"):
        read_user_features(str(path), "user", ["age"])
    rows[1]["pool"] = "c"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 1: user 'u1' has pool='c', but an earlier row of the same user has "
                                         r"pool='a'"):
        read_user_features(str(path), "user", ["pool", "profile"])


def test_table_standardises_numeric_features():
    """Training users' profiles (0, 0), (2, 4): mean (1, 2), sd (1, 2) → user 0 reads (−1, −1), user 1 (1, 1), the
    no-user row (id −1) the mean, 0 once standardised; a new user (3, 2) is encoded on the same scale: (2, 0)."""
    enc = UserFeatureEncoder([SPECS[2]], num_users=2)
    enc.set_table([{"profile": [0, 0]}, {"profile": [2, 4]}])
    assert enc(torch.tensor([0, 1, -1])).tolist() == [[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]
    assert enc(encoded=enc.encode([{"profile": [3, 2]}, None])).tolist() == [[2.0, 0.0], [0.0, 0.0]]


def test_add_user_features_gives_each_user_one_profile():
    from mixdpo_ds.apps.datasets.user_profiles import add_user_features, user_feature_specs

    rows = [{"user": f"{g}_{k}", "group": g} for g in ("a", "b") for k in range(3) for _ in range(4)]
    profiles = add_user_features(rows, ["a", "b"], seed=0)
    assert len(profiles) == 6 and all(r["pool"] == profiles[r["user"]]["pool"] for r in rows)
    assert {profiles[f"a_{k}"]["pool"] for k in range(3)} == {"p0"}  # p_pool = 1: the group's pool
    enc = UserFeatureEncoder(user_feature_specs(2), num_users=6)
    enc.set_table(list(profiles.values()))
    assert enc.width == 3 + 2 + 2
