"""Resume equals an uninterrupted run, step by step; a SIGKILLed run resumes from its last checkpoint.

The resume run uses everything that carries state across steps: a trained MoE gate with its own AdamW,
Gumbel noise from the trainer's generator (em.mode=gumbel), a warm-up + linear lr schedule, and a
metrics accumulator that spans the checkpoint (log_every=2 with the checkpoint at an odd step).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixdpo_ds.training import checkpoint as ckpt
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.trainer import MixDPOTrainer

from .conftest import base_overrides, read_rows, train, train_rows

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
STATEFUL = {"experts.num_experts": 2, "gate.kind": "moe", "gate.features": "prompt", "gate.lr": 0.05,
            "em.mode": "gumbel", "train.lr_schedule": "linear", "train.warmup_steps": 1, "train.lr": 1e-2,
            "train.max_steps": 6, "train.log_every": 2}
COMPARE = ("loss", "policy_loss", "gate_loss", "resp/mean_0", "gate/w_0", "learning_rate", "experts/1/margin",
           "rewards/accuracies", "grad_norm")


def assert_same_steps(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in COMPARE:
            assert abs(ra[key] - rb[key]) <= 1e-6 * max(1.0, abs(ra[key])), (ra["step"], key, ra[key], rb[key])


def assert_same_export(a: Path, b: Path) -> None:
    for sub in ("expert_0/model.safetensors", "expert_1/model.safetensors", "gate/gate.safetensors"):
        wa, wb = load_file(a / "export" / sub), load_file(b / "export" / sub)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-7, rtol=0, msg=f"{sub}:{k}")


def test_resume_equals_uninterrupted(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    full = train_rows(train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "a", **STATEFUL))
    # The same run with checkpoints at steps 3 (mid log interval with log_every=2) and 6: saving changes nothing.
    b = tmp_path / "b"
    saved = train_rows(train(tiny_gpt2_dir, prefs_jsonl, b, **{**STATEFUL, "train.save_every": 3,
                                                                "train.keep_last": 0}))
    assert_same_steps(full, saved)
    # Interrupted after step 3: a fresh run directory holding only that checkpoint (and the metrics so far).
    c = tmp_path / "c"
    (c / "checkpoints").mkdir(parents=True)
    shutil.copytree(b / "checkpoints" / "step_3", c / "checkpoints" / "step_3")
    (c / "checkpoints" / "latest").write_text("step_3")
    shutil.copy(b / "metrics.jsonl", c / "metrics.jsonl")  # rows after step 3 get dropped on resume
    resumed = train_rows(train(tiny_gpt2_dir, prefs_jsonl, c, **{**STATEFUL, "train.resume_from": "auto"}))
    assert_same_steps(full, resumed)
    assert_same_export(tmp_path / "a", c)


STEPS_KILLED = 60  # checkpoints every 2 steps: the kill (0.3 s after the first) lands well before the end


def test_sigkill_resumes_from_last_checkpoint(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    out = tmp_path / "killed"
    common = {"train.save_every": 2, "train.keep_last": 2, "experts.num_experts": 2}
    # max_steps is part of the run (the lr schedule depends on it): the resumed run must use the same value
    over = base_overrides(tiny_gpt2_dir, prefs_jsonl, out, **common, **{"train.max_steps": STEPS_KILLED})
    # A fresh single process: drop the rendezvous variables this pytest process may have set for itself.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mixdpo_ds.cli", "train", "--config", str(CONFIG), *over],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    try:
        while not latest.exists():
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        time.sleep(0.3)  # let it get into the next steps (or the middle of another save)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    # the checkpoint a resume uses (newer than `latest` when the kill fell between a rename and the pointer update)
    ckpt_step = int(ckpt.find_latest(out).name.removeprefix("step_"))
    assert ckpt_step >= 2 and ckpt_step % 2 == 0

    cfg = load_config(CONFIG, base_overrides(tiny_gpt2_dir, prefs_jsonl, out, **common, **{
        "train.max_steps": STEPS_KILLED, "train.resume_from": "auto"}))
    trainer = MixDPOTrainer(cfg)
    trainer.setup()
    try:
        assert trainer.step == ckpt_step  # resumed, not restarted
        trainer.train()
    finally:
        trainer.cleanup()
    steps = [r["step"] for r in train_rows(read_rows(out / "metrics.jsonl"))]
    assert ckpt_step < STEPS_KILLED, "the run finished before the kill: raise STEPS_KILLED"
    assert steps == list(range(1, STEPS_KILLED + 1))  # each step logged exactly once across the kill
    assert (out / "checkpoints" / f"step_{STEPS_KILLED}" / "trainer_state.pt").exists()
    assert not list((out / "checkpoints").glob(".tmp_*"))


def test_resume_refuses_a_changed_run_and_allows_harmless_keys(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    """A changed num_experts (or lr) on resume names the key and both values; logging cadence may change; gate
    pre-training does not run again on resume (the gate comes from the checkpoint)."""
    out = tmp_path / "run"
    run = {"experts.num_experts": 2, "train.max_steps": 2, "train.save_every": 1, "gate.kind": "moe",
           "gate.pretrain_steps": 5, "gate.pretrain_label_column": "group", "train.export": False}
    train(tiny_gpt2_dir, prefs_jsonl, out, **run)
    for key, value, shown in (("experts.num_experts", 3, "2 (checkpoint) -> 3 (now)"),
                              ("train.lr", 0.5, "0.001 (checkpoint) -> 0.5 (now)")):
        cfg = load_config(CONFIG, base_overrides(tiny_gpt2_dir, prefs_jsonl, out, **{
            **run, key: value, "train.resume_from": "auto"}))
        trainer = MixDPOTrainer(cfg)
        with pytest.raises(ValueError, match="cannot resume") as err:
            trainer.setup()
        trainer.cleanup()
        assert f"{key}: {shown}" in str(err.value)
    import mixdpo_ds.training.trainer_setup as trainer_module

    calls = []
    real = trainer_module.pretrain_gate_on_labels
    trainer_module.pretrain_gate_on_labels = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        cfg = load_config(CONFIG, base_overrides(tiny_gpt2_dir, prefs_jsonl, out, **run, **{
            "train.log_every": 2, "train.resume_from": "auto"}))  # harmless change
        trainer = MixDPOTrainer(cfg)
        trainer.setup()
        assert trainer.step == 2 and calls == []
        trainer.cleanup()
    finally:
        trainer_module.pretrain_gate_on_labels = real
