"""User features as gate inputs (`gate.features=user_features` / `prompt+user_features`; paper App. G): a gate
that routes a user by what is known about them (age band, country, annotator pool, a numeric profile vector), so a
user the training data never had is routed at once from their features, where an id embedding gives them all one prior.

Encoders are declared in the config (`gate.user_features`, one `UserFeatureSpec` per column):
- categorical: the value's row of a learned embedding (`dim`); the declared `categories` each have a row, any other
  value, or none, shares one "other" row.
- numeric: a number (`size` 1) or a list of `size` numbers, standardised by the training users' mean and standard
  deviation (so an age in years does not drown the other inputs).
The encoder's output (B, Σ widths) is concatenated to the gate's other inputs.

Training passes user ids only, so the encoder keeps a table of the training users' encoded features (buffers
indexed by user id, row num_users for "no user"), filled by `set_table` from the data before the first step
(`mixdpo_ds.training.user_features.attach_user_features`). Evaluation and generation can instead pass the features
of any user directly (`encode` → `forward(encoded=...)`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

FEATURE_KINDS = ("categorical", "numeric")


@dataclass
class UserFeatureSpec:
    """One user feature column of the gate (`gate.user_features[]`)."""

    column: str = field(metadata={"help": "data column with the feature's value (the same on every row of a user)"})
    kind: str = field(default="categorical", metadata={"help": "categorical | numeric"})
    categories: list[str] = field(default_factory=list, metadata={
        "help": "categorical: the known values (each gets an embedding row; any other value or a missing one "
                "shares one 'other' row)"})
    dim: int = field(default=4, metadata={"help": "categorical: embedding size"})
    size: int = field(default=1, metadata={"help": "numeric: length of the value (a number: 1; a list: its length)"})

    def __post_init__(self):
        where = f"gate.user_features[{self.column!r}]"
        if not isinstance(self.column, str) or not self.column:
            raise ValueError(f"gate.user_features[].column must be a column name, got {self.column!r}")
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"{where}.kind={self.kind!r}: allowed {FEATURE_KINDS}")
        if self.kind == "categorical" and not self.categories:
            raise ValueError(f"{where}.categories is empty: list the known values of a categorical feature")
        self.categories = [str(c) for c in self.categories]
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"{where}.categories has repeated values: {self.categories}")
        if self.dim < 1 or self.size < 1:
            raise ValueError(f"{where}: dim and size must be >= 1, got dim={self.dim}, size={self.size}")

    @property
    def width(self) -> int:
        return self.dim if self.kind == "categorical" else self.size


def parse_specs(specs: list) -> list[UserFeatureSpec]:
    """gate.user_features (mappings or specs) → specs; column names must be distinct."""
    out = [s if isinstance(s, UserFeatureSpec) else UserFeatureSpec(**s) for s in specs]
    names = [s.column for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"gate.user_features: each column once, got {names}")
    return out


class UserFeatureEncoder(nn.Module):
    """(categorical indices (B, C) long, numeric values (B, N) float) → (B, width) gate input."""

    def __init__(self, specs: list, num_users: int):
        super().__init__()
        self.specs = parse_specs(specs)
        self.num_users = num_users
        self.categorical = [s for s in self.specs if s.kind == "categorical"]
        self.numeric = [s for s in self.specs if s.kind == "numeric"]
        self.embeddings = nn.ModuleList([nn.Embedding(len(s.categories) + 1, s.dim) for s in self.categorical])
        self.width = sum(s.width for s in self.specs)
        other = torch.tensor([len(s.categories) for s in self.categorical], dtype=torch.long)
        self.register_buffer("table_categorical", other.repeat(num_users + 1, 1))           # (U + 1, C)
        self.register_buffer("table_numeric", torch.zeros(num_users + 1, sum(s.size for s in self.numeric)))
        self.register_buffer("table_filled", torch.tensor(False))
        n_num = self.table_numeric.shape[1]
        self.register_buffer("numeric_mean", torch.zeros(n_num))  # of the training users: inputs are standardised
        self.register_buffer("numeric_std", torch.ones(n_num))

    def encode(self, values: list[dict | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw feature values, one mapping column → value per user → (categorical (n, C) long, numeric (n, N)).
        None (no user) encodes as the no-user row: every categorical "other", numeric the training users' mean."""
        none = [v is None for v in values]
        values = [v or {} for v in values]
        cat = torch.tensor([[s.categories.index(str(v[s.column])) if v.get(s.column) is not None
                             and str(v[s.column]) in s.categories else len(s.categories) for s in self.categorical]
                            for v in values], dtype=torch.long).reshape(len(values), len(self.categorical))
        num = torch.zeros(len(values), self.table_numeric.shape[1])
        for i, v in enumerate(values):
            if none[i]:
                num[i] = self.numeric_mean.cpu()
                continue
            parts = []
            for s in self.numeric:
                x = v.get(s.column)
                x = [x] if isinstance(x, (int, float)) and not isinstance(x, bool) else x
                if not isinstance(x, (list, tuple)) or len(x) != s.size or \
                        not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in x):
                    raise ValueError(f"gate.user_features[{s.column!r}] is numeric with size {s.size}, but a user "
                                     f"has {s.column}={x!r} (user {v.get('user', i)!r})")
                parts += [float(e) for e in x]
            if parts:
                num[i] = torch.tensor(parts)
        return cat, num

    @torch.no_grad()
    def set_table(self, values: list[dict]) -> None:
        """Fill the training users' rows: values[i] = the features of user id i (len = num_users)."""
        if len(values) != self.num_users:
            raise ValueError(f"user feature table: {len(values)} users given, the gate has {self.num_users}")
        cat, num = self.encode(values)
        self.table_categorical[:self.num_users] = cat.to(self.table_categorical.device)
        self.table_numeric[:self.num_users] = num.to(self.table_numeric.device)
        if num.shape[1] and len(values):
            self.numeric_mean.copy_(num.mean(0))
            self.numeric_std.copy_(num.std(0, unbiased=False).clamp_min(1e-6) if len(values) > 1 else
                                   torch.ones(num.shape[1]))
            self.table_numeric[self.num_users] = self.numeric_mean  # no user: the mean (0 once standardised)
        self.table_filled.fill_(True)

    def forward(self, user_ids: torch.Tensor | None = None,
                encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Features of user_ids (B,) from the table (-1: the no-user row), or of `encoded` → (B, width)."""
        if encoded is None:
            if user_ids is None:
                raise ValueError("gate.features uses 'user_features' but neither user ids nor features were given")
            if not bool(self.table_filled):
                raise RuntimeError("the gate's user feature table is empty: fill it from the data before training "
                                   "(mixdpo_ds.training.user_features.attach_user_features; the trainer does it "
                                   "in setup), or pass the users' encoded features")
            ids = user_ids.long().to(self.table_categorical.device)
            ids = torch.where(ids < 0, self.num_users, ids)
            cat, num = self.table_categorical[ids], self.table_numeric[ids]
        else:
            cat, num = (t.to(self.table_categorical.device) for t in encoded)
        num = (num.float() - self.numeric_mean) / self.numeric_std
        parts = [emb(cat[:, j]) for j, emb in enumerate(self.embeddings)] + [num]
        return torch.cat(parts, dim=-1)                                                    # (B, width)
