"""`gate.user_dropout` (docs/math.md §13.5): a share of training pairs shown to the gate as 'no user' (id −1), drawn
by a hash of (seed, step, pair index), so the shared no-user row learns the population's mixture."""
from __future__ import annotations

import pytest
import torch

from mixdpo_ds.model.gating import GateConfig
from mixdpo_ds.training.batch import _hash32, drop_users


def test_rate_zero_keeps_every_user():
    users, index = torch.arange(5), torch.arange(100, 105)
    assert torch.equal(drop_users(users, index, step=3, seed=0, rate=0.0), users)


def test_the_draw_is_a_function_of_seed_step_and_index():
    users, index = torch.arange(64) % 7, torch.arange(64)
    a = drop_users(users, index, step=5, seed=1, rate=0.5)
    assert torch.equal(a, drop_users(users, index, step=5, seed=1, rate=0.5))        # resume repeats it
    assert not torch.equal(a, drop_users(users, index, step=6, seed=1, rate=0.5))    # a new draw each step
    assert not torch.equal(a, drop_users(users, index, step=5, seed=2, rate=0.5))    # and each seed
    dropped = a == -1
    assert torch.equal(a[~dropped], users[~dropped])                                 # the others keep their id
    # a pair's draw does not depend on which other pairs share its batch
    assert torch.equal(drop_users(users[10:20], index[10:20], step=5, seed=1, rate=0.5), a[10:20])


def test_the_dropped_share_is_the_rate():
    n = 20_000  # binomial sd of the share at rate 0.3: 0.0032
    index = torch.arange(n)
    for rate in (0.1, 0.3):
        share = float((drop_users(torch.zeros(n, dtype=torch.long), index, 7, 0, rate) == -1).float().mean())
        assert abs(share - rate) < 0.015, (rate, share)


def test_the_hash_by_hand():
    # x = (0·φ + 5 + c) mod 2³² with φ = 0x9E3779B1, c = 0x7F4A7C15; then the murmur3 finaliser
    x = (5 + 0x7F4A7C15) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    assert _hash32(5) == x ^ (x >> 16)
    assert 0 <= _hash32(1, 2, 3) < 2 ** 32 and _hash32(1, 2, 3) != _hash32(1, 3, 2)


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_a_rate_outside_0_1_is_refused(rate):
    with pytest.raises(ValueError, match="gate.user_dropout"):
        GateConfig(kind="moe", features="user", user_dropout=rate)
