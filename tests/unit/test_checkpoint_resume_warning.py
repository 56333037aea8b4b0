"""A fresh start into a run directory that already holds checkpoints warns (train.resume_from is null by default)."""
import logging

from mixdpo_ds.training.checkpoint import ENGINE_TAG, STATE_FILE, resolve_resume


def test_fresh_start_over_checkpoints_warns_and_names_auto(tmp_path, caplog):
    step = tmp_path / "checkpoints" / "step_3"
    (step / ENGINE_TAG).mkdir(parents=True)
    (step / STATE_FILE).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="mixdpo_ds"):
        assert resolve_resume(None, tmp_path) is None
    assert "step_3" in caplog.text and "train.resume_from=auto" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mixdpo_ds"):
        assert resolve_resume("auto", tmp_path) == step
        assert resolve_resume(None, tmp_path / "new_run") is None  # nothing there: silent
    assert caplog.text == ""
