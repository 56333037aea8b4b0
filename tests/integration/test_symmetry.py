"""Symmetry breaking (docs/math.md §8): K identical heads under a uniform gate stay identical forever; each of
experts.init_noise and em.warmup_random_steps makes the responsibilities leave uniform."""
from __future__ import annotations

import logging
import math

import pytest

from .conftest import train, train_rows

pytestmark = pytest.mark.integration
RUN = {"experts.kind": "heads", "experts.num_experts": 2, "experts.init_noise": 0.0, "gate.kind": "mix",
       "train.max_steps": 5, "train.lr": 1e-2, "train.micro_batch_size": 8, "loss.beta": 0.5, "train.export": False}
LOG2 = math.log(2)


def test_identical_heads_never_split(tiny_gpt2_dir, prefs_by_prompt_jsonl, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mixdpo_ds"):
        rows = train_rows(train(tiny_gpt2_dir, prefs_by_prompt_jsonl, tmp_path / "none", **RUN))
    assert any("symmetry never breaks" in r.getMessage() for r in caplog.records)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it does learn ...
    for r in rows:  # ... but both experts learn the same thing: q = w = (1/2, 1/2) at every step
        assert abs(r["resp/entropy"] - LOG2) < 1e-6 and abs(r["resp/mean_0"] - 0.5) < 1e-6
        assert abs(r["gate/w_0"] - 0.5) < 1e-6
        assert abs(r["experts/0/margin"] - r["experts/1/margin"]) < 1e-6


@pytest.mark.parametrize("option", [{"experts.init_noise": 0.3}, {"em.warmup_random_steps": 2}],
                         ids=["init_noise", "warmup_random_steps"])
def test_each_option_breaks_symmetry(tiny_gpt2_dir, prefs_by_prompt_jsonl, tmp_path, option):
    rows = train_rows(train(tiny_gpt2_dir, prefs_by_prompt_jsonl, tmp_path / "run", **{**RUN, **option}))
    after = rows[2:]  # past the random warm-up: these are exact E-step posteriors
    assert all(r["resp/entropy"] < LOG2 - 1e-3 for r in after), [r["resp/entropy"] for r in after]
    assert abs(after[-1]["experts/0/margin"] - after[-1]["experts/1/margin"]) > 1e-3
