"""User feature columns of the data → the gate's user feature table (`gate.features=…user_features`,
`mixdpo_ds/model/user_features.py`).

A user's features are read from the pair rows (every row of a user carries them; rows of one user that disagree are
an error naming the user, the column and both values). `attach_user_features` fills the gate's table of the
training users (by the data's user ids); the trainer calls it in `setup`, right after building the gate.
`read_user_features` serves evaluation and generation, which route users the training data
never had from their features.
"""
from __future__ import annotations

import os
from collections import Counter


def _dataset(path: str, split: str):
    from mixdpo_ds.training.data_files import load_local

    path = os.path.expanduser(path)
    if os.path.isfile(path) or os.path.isdir(path):
        return load_local(path, split, f"data.path={path}", "error", lambda d, lab: {}, Counter())[0]
    import datasets

    return datasets.load_dataset(path, split=split)


def read_user_features(path: str, user_column: str, columns: list[str], split: str = "train") -> dict[str, dict]:
    """{user: {column: value}} from the rows of `path`; a missing feature column is an error naming it."""
    ds = _dataset(path, split)
    missing = [c for c in [user_column, *columns] if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: user feature column(s) {missing} not found (gate.user_features / "
                         f"data.user_column); columns: {ds.column_names}")
    table = ds.select_columns([user_column, *columns])[:]
    out: dict[str, dict] = {}
    for i, user in enumerate(table[user_column]):
        if user is None:
            continue
        name = str(int(user)) if isinstance(user, float) and user.is_integer() else str(user)
        values = {c: table[c][i] for c in columns}
        seen = out.setdefault(name, values)
        for c in columns:
            if seen[c] != values[c]:
                raise ValueError(f"{path} row {i}: user {name!r} has {c}={values[c]!r}, but an earlier row of the "
                                 f"same user has {c}={seen[c]!r}; a user feature must be the same on all of a user's "
                                 "rows")
    return out


def feature_columns(gate_cfg) -> list[str]:
    return [spec["column"] for spec in gate_cfg.user_features]


def attach_user_features(gate, cfg, user_vocab: dict[str, int]) -> int:
    """Fill the gate's feature table of the data's users (ids of `user_vocab`) from cfg.data.path (and
    cfg.data.eval_path); returns the number of users. A no-op (0) for a gate without user features."""
    encoder = getattr(gate, "user_features", None)
    if encoder is None:
        return 0
    d = cfg.data
    columns = feature_columns(cfg.gate)
    found = read_user_features(d.path, d.user_column, columns, d.split)
    if d.eval_path is not None or d.eval_split is not None:
        found.update(read_user_features(d.eval_path or d.path, d.user_column, columns, d.eval_split or "train"))
    missing = sorted(set(user_vocab) - set(found))
    if missing:
        raise ValueError(f"user feature table: {len(missing)} user(s) of the data have no feature values, e.g. "
                         f"{missing[:5]}")
    by_id = [None] * len(user_vocab)
    for name, i in user_vocab.items():
        by_id[i] = {"user": name, **found[name]}
    encoder.set_table(by_id)
    return len(by_id)
