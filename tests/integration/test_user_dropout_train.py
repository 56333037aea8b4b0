"""`gate.user_dropout` in training (docs/math.md §13.5): with it the gate's shared no-user row (the prior of every
user the training data did not have) is trained; without it no pair reaches that row, and evaluate says so."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mixdpo_ds import cli
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.trainer import MixDPOTrainer

from .conftest import base_overrides

pytestmark = pytest.mark.integration


def _no_user_row(tiny_gpt2_dir, prefs_jsonl, run: Path, rate: float):
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    cfg = load_config(config, base_overrides(tiny_gpt2_dir, prefs_jsonl, run, **{
        "experts.num_experts": 2, "gate.kind": "moe", "gate.features": "user", "gate.lr": 0.05,
        "gate.user_dropout": rate, "em.warmup_random_steps": 1, "train.max_steps": 4}))
    trainer = MixDPOTrainer(cfg)
    trainer.setup()
    try:
        table = trainer.gate.user_embedding.weight
        start = table.detach().clone()
        trainer.train()
        return start, table.detach().clone()
    finally:
        trainer.cleanup()


def test_only_user_dropout_trains_the_no_user_row(tiny_gpt2_dir, prefs_jsonl, tmp_path, caplog):
    start, end = _no_user_row(tiny_gpt2_dir, prefs_jsonl, tmp_path / "off", 0.0)
    assert torch.equal(end[-1], start[-1])            # last row = id −1: no training pair reached it
    assert not torch.equal(end[:-1], start[:-1])      # the users' rows did move
    start, end = _no_user_row(tiny_gpt2_dir, prefs_jsonl, tmp_path / "on", 0.5)
    assert not torch.equal(end[-1], start[-1])

    # unseen users are routed by that row; evaluate names the option when training never fit it
    new = tmp_path / "new_users.jsonl"
    new.write_text(Path(prefs_jsonl).read_text().replace('"user": "u', '"user": "new_u'))
    for run, says in (("off", "not the population's mixture"), ("on", "trained on 50% of the training pairs")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert cli.main(["evaluate", "--run", str(tmp_path / run), "--data", str(new),
                             "--out", str(tmp_path / f"{run}.jsonl")]) == 0
        assert says in caplog.text and "gate.user_dropout" in caplog.text, caplog.text
