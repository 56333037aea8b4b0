"""Atomic checkpoints: latest pointer, rotation, a crash mid-save leaves the previous checkpoint usable,
resume_from resolution, RNG state round trip. A fake engine stands in for DeepSpeed (the real engine is
exercised by tests/integration/test_resume.py)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mixdpo_ds.training import checkpoint as ckpt


class FakeEngine:
    def __init__(self, value: float = 0.0, fail: bool = False):
        self.value, self.fail = value, fail

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        torch.save({"value": self.value}, d / "model.pt")
        if self.fail:
            raise KeyboardInterrupt("killed mid-save")

    def load_checkpoint(self, load_dir, tag, **kwargs):
        self.value = torch.load(Path(load_dir) / tag / "model.pt")["value"]
        return str(Path(load_dir) / tag), {}


def test_save_latest_rotation_and_load(tmp_path):
    for step in (2, 4, 6):
        path = ckpt.save_checkpoint(FakeEngine(step), tmp_path, step, {"step": step}, keep_last=2)
        assert path == tmp_path / "checkpoints" / f"step_{step}"
        assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{step}"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]  # step_2 rotated away
    engine = FakeEngine()
    state = ckpt.load_checkpoint(engine, ckpt.find_latest(tmp_path))
    assert state == {"step": 6} and engine.value == 6
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


def test_crash_mid_save_keeps_previous(tmp_path):
    ckpt.save_checkpoint(FakeEngine(1.0), tmp_path, 1, {"step": 1})
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(FakeEngine(2.0, fail=True), tmp_path, 2, {"step": 2})
    assert (tmp_path / "checkpoints" / ".tmp_step_2").exists()  # the half-written save is left ...
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoints" / "step_1"  # ... and ignored
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step_1"
    ckpt.save_checkpoint(FakeEngine(3.0), tmp_path, 3, {"step": 3})  # the next save cleans it up
    assert not (tmp_path / "checkpoints" / ".tmp_step_2").exists()


def test_crash_between_rename_and_latest_update_resumes_the_renamed_checkpoint(tmp_path, monkeypatch):
    """step_2's directory is renamed into place, then the process dies while writing `latest` (still step_1):
    step_2 is complete and is what resume finds and loads, not the older step_1."""
    ckpt.save_checkpoint(FakeEngine(1.0), tmp_path, 1, {"step": 1})
    real_write = ckpt._write_text_atomic

    def killed(path, text):
        raise KeyboardInterrupt("killed while writing latest")

    monkeypatch.setattr(ckpt, "_write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(FakeEngine(2.0), tmp_path, 2, {"step": 2})
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_1"  # stale
    assert ckpt.is_complete(root / "step_2") and not (root / ".tmp_step_2").exists()
    assert ckpt.find_latest(tmp_path) == root / "step_2"
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step_2"
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == root / "step_2"
    engine = FakeEngine()
    assert ckpt.load_checkpoint(engine, ckpt.resolve_resume("auto", tmp_path)) == {"step": 2} and engine.value == 2.0

    # the resumed run saves on: `latest` moves past both
    monkeypatch.setattr(ckpt, "_write_text_atomic", real_write)
    ckpt.save_checkpoint(FakeEngine(3.0), tmp_path, 3, {"step": 3})
    assert ckpt.find_latest(tmp_path) == root / "step_3"


def test_stale_checkpoints_of_an_abandoned_run_are_not_resumed(tmp_path):
    """A run saved steps 2, 4, 6; it is resumed from step_2 by path into the same directory and saves step_4
    again: `latest` (step_4) wins over the old, higher step_6, which continued the *old* step_4."""
    for step in (2, 4, 6):
        ckpt.save_checkpoint(FakeEngine(step), tmp_path, step, {"step": step})
    ckpt.save_checkpoint(FakeEngine(40.0), tmp_path, 4, {"step": 4, "branch": "new"})
    root = tmp_path / "checkpoints"
    assert ckpt.find_latest(tmp_path) == root / "step_4"
    assert ckpt.read_trainer_state(ckpt.find_latest(tmp_path)) == {"step": 4, "branch": "new"}


def test_latest_pointer_to_missing_dir_falls_back(tmp_path):
    ckpt.save_checkpoint(FakeEngine(), tmp_path, 5, {"step": 5})
    (tmp_path / "checkpoints" / "latest").write_text("step_9")  # e.g. rotated by hand
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoints" / "step_5"


def test_resolve_resume(tmp_path):
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    ckpt.save_checkpoint(FakeEngine(), tmp_path, 3, {"step": 3})
    step3 = tmp_path / "checkpoints" / "step_3"
    assert ckpt.resolve_resume(str(step3), tmp_path / "elsewhere") == step3
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == step3  # a run directory
    assert ckpt.resolve_resume(str(tmp_path / "checkpoints"), tmp_path / "elsewhere") == step3
    with pytest.raises(FileNotFoundError, match="train.resume_from"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_resaving_a_step_never_deletes_the_only_good_copy(tmp_path, monkeypatch):
    """keep_last=1, step 2 saved, then saved again (the final save after a periodic one): a crash after the old
    copy is moved aside and before the new one is in place still leaves step 2 to resume from."""
    ckpt.save_checkpoint(FakeEngine(1.0), tmp_path, 1, {"step": 1}, keep_last=1)
    ckpt.save_checkpoint(FakeEngine(2.0), tmp_path, 2, {"step": 2}, keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]  # the only copy
    real_replace = ckpt.os.replace

    def crash_on_new_copy(src, dst):
        if Path(src).name.startswith(".tmp_step_"):
            raise KeyboardInterrupt("killed between moving the old copy aside and renaming the new one")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_new_copy)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(FakeEngine(2.5), tmp_path, 2, {"step": 2, "again": True}, keep_last=1)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    found = ckpt.resolve_resume("auto", tmp_path)
    assert found is not None and found.name == ".old_step_2"
    engine = FakeEngine()
    assert ckpt.load_checkpoint(engine, found) == {"step": 2} and engine.value == 2.0
    # a finished re-save leaves one step_2 and nothing aside
    ckpt.save_checkpoint(FakeEngine(2.5), tmp_path, 2, {"step": 2, "again": True}, keep_last=1)
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step_2"]
    assert not (tmp_path / "checkpoints" / ".old_step_2").exists()


def test_a_failed_write_names_the_checkpoint_and_free_space(tmp_path, monkeypatch):
    """A full disk (torch.save raising the bare 'basic_ios::clear: iostream error') names the path."""
    ckpt.save_checkpoint(FakeEngine(1.0), tmp_path, 1, {"step": 1})

    def full_disk(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"writing checkpoint .*\.tmp_step_2 failed \(RuntimeError: basic_ios") as err:
        ckpt.save_checkpoint(FakeEngine(2.0), tmp_path, 2, {"step": 2})
    assert "MiB free" in str(err.value)
    monkeypatch.undo()
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoints" / "step_1"
