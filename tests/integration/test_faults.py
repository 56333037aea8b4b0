"""Nothing lost, nothing silently wrong (README "Failure behaviour"): a finished run stays finished, one run per
run directory, a damaged checkpoint falls back to the previous intact one, and a non-finite loss never reaches the
weights (stop) or drops only its own step (skip)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.guard import NonFiniteError
from mixdpo_ds.training.run_dir import RunDirInUse, RunLock
from mixdpo_ds.training.trainer import MixDPOTrainer

from .conftest import base_overrides, read_rows, train, train_rows

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
RUN = {"experts.num_experts": 2, "train.max_steps": 3, "train.save_every": 1, "train.keep_last": 0,
       "train.resume_from": "auto"}


def _trainer(model, data, out, **extra) -> MixDPOTrainer:
    trainer = MixDPOTrainer(load_config(CONFIG, base_overrides(model, data, out, **{**RUN, **extra})))
    trainer.setup()
    return trainer


def test_rerunning_a_finished_run_changes_nothing(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    out = tmp_path / "done"
    train(tiny_gpt2_dir, prefs_jsonl, out, **RUN)
    files = {p: p.stat().st_mtime_ns for p in [out / "config.yaml", out / "metrics.jsonl",
                                                 *(out / "export").rglob("*.safetensors")]}
    train(tiny_gpt2_dir, prefs_jsonl, out, **RUN)  # same config: trains nothing, exports nothing, rewrites nothing
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert [r["step"] for r in train_rows(read_rows(out / "metrics.jsonl"))] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"loss.beta: 0.1 \(checkpoint\) -> 0.5 \(now\)"):
        train(tiny_gpt2_dir, prefs_jsonl, out, **{**RUN, "loss.beta": 0.5, "train.lr": 0.01})
    assert (out / "config.yaml").stat().st_mtime_ns == files[out / "config.yaml"]  # still the run's own config


def test_two_runs_cannot_share_an_output_dir(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    out = tmp_path / "shared"
    holder = RunLock(out)
    holder.acquire()  # another run, alive
    try:
        with pytest.raises(RunDirInUse, match=rf"{out} is in use by another run \(pid \d+ on .*, since "):
            train(tiny_gpt2_dir, prefs_jsonl, out, **RUN)
    finally:
        holder.release()
    assert not (out / "metrics.jsonl").exists()
    train(tiny_gpt2_dir, prefs_jsonl, out, **RUN)  # free again: the lock dies with its holder


@pytest.mark.parametrize("damage", ["trainer_state", "engine"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_gpt2_dir, prefs_jsonl, tmp_path, damage,
                                                                   caplog):
    out = tmp_path / "damaged"
    full = train_rows(train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "full", **RUN))
    train(tiny_gpt2_dir, prefs_jsonl, out, **{**RUN, "train.max_steps": 3})
    (out / "FINISHED").unlink()  # pretend the run died right after its step-3 checkpoint
    step3 = out / "checkpoints" / "step_3"
    victim = step3 / "trainer_state.pt" if damage == "trainer_state" else next((step3 / "engine").rglob("*.pt"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    trainer = _trainer(tiny_gpt2_dir, prefs_jsonl, out)
    try:
        assert trainer.step == 2  # resumed from the intact step 2, not from scratch and not a crash
        assert f"checkpoint {step3} is damaged" in caplog.text
        trainer.train()
    finally:
        trainer.cleanup()
    resumed = train_rows(read_rows(out / "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert abs(resumed[-1]["loss"] - full[-1]["loss"]) < 1e-6  # step 3 redone exactly


def _poison_step(trainer, bad_step: int) -> None:
    """Make the policy objective non-finite at optimizer step `bad_step` (0-based), as a diverged model would."""
    real = trainer.policy_objective

    def poisoned(res, batch, policy_logps):
        loss, extra = real(res, batch, policy_logps)
        return (loss * math.inf if trainer.step == bad_step else loss), extra

    trainer.policy_objective = poisoned


def test_nonfinite_loss_stops_before_the_weights_change(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    trainer = _trainer(tiny_gpt2_dir, prefs_jsonl, tmp_path / "stop", **{"train.save_every": 0})
    try:
        _poison_step(trainer, 0)
        before = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
        with pytest.raises(NonFiniteError, match=r"non-finite loss inf at step 1, micro-batch 0 \(dataset rows"):
            trainer.train()
        for n, p in trainer.engine.module.named_parameters():
            assert torch.equal(p, before[n]), n
    finally:
        trainer.cleanup()
    assert not (tmp_path / "stop" / "checkpoints").exists()


def test_nonfinite_skip_drops_only_that_step(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    trainer = _trainer(tiny_gpt2_dir, prefs_jsonl, tmp_path / "skip", **{"train.nonfinite": "skip",
                                                                        "train.grad_accum": 2})
    snapshots = []
    try:
        _poison_step(trainer, 1)
        real_step = trainer.em_step

        def em_step():
            record = real_step()
            snapshots.append({n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()})
            return record

        trainer.em_step = em_step
        trainer.train()
    finally:
        trainer.cleanup()
    rows = read_rows(tmp_path / "skip" / "metrics.jsonl")
    train_steps = train_rows(rows)
    assert [r["nonfinite/skipped_steps"] for r in rows if "learning_rate" in r] == [0, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in train_steps)
    heads = "heads"
    assert torch.equal(snapshots[1][heads], snapshots[0][heads])  # step 2 left the weights as step 1 did
    assert not torch.equal(snapshots[2][heads], snapshots[1][heads])  # step 3 trained again
