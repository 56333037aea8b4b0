"""training/resume.py: which config changes a resume refuses, and the error's wording."""
import pytest

from mixdpo_ds.training.resume import HARMLESS, check_resume, run_altering_changes


def _cfg(**over):
    cfg = {"experts": {"num_experts": 3, "kind": "heads"}, "train": {"lr": 1e-3, "log_every": 1, "max_steps": 8},
           "world_size": 2}
    for key, value in over.items():
        section, _, name = key.partition(".")
        if name:
            cfg[section] = {**cfg[section], name: value}
        else:
            cfg[section] = value
    return cfg


def test_unchanged_and_harmless_changes_pass():
    check_resume(_cfg(), _cfg(), "ckpt")
    check_resume(_cfg(), _cfg(**{"train.log_every": 10}), "ckpt")
    assert "train.log_every" in HARMLESS and "train.max_steps" not in HARMLESS


def test_world_size_and_experts_changes_are_named():
    changes = run_altering_changes(_cfg(), _cfg(world_size=4, **{"experts.num_experts": 2}))
    assert changes == [("experts.num_experts", 3, 2), ("world_size", 2, 4)]
    with pytest.raises(ValueError) as err:
        check_resume(_cfg(), _cfg(world_size=4), "runs/x/checkpoints/step_2")
    msg = str(err.value)
    assert "runs/x/checkpoints/step_2" in msg and "world_size: 2 (checkpoint) -> 4 (now)" in msg


def test_a_new_key_counts_as_a_change():
    with pytest.raises(ValueError, match=r"train.seed: <absent> \(checkpoint\) -> 1 \(now\)"):
        check_resume(_cfg(), _cfg(**{"train.seed": 1}), "ckpt")
