"""`mixdpo train` refuses, before DeepSpeed starts, a data.max_length beyond the model's positions and a
user-routed gate on data without user ids (mixdpo_ds.training.data.check_lengths / check_user_gate, called in
MixDPOTrainer.setup)."""
from __future__ import annotations

import json

import pytest

from .conftest import synthetic_rows, train

pytestmark = pytest.mark.integration


def test_train_refuses_a_max_length_beyond_the_model_positions(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    with pytest.raises(ValueError) as e:
        train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "run", **{"data.max_length": 256, "data.max_prompt_length": 24})
    assert str(e.value) == ("data.max_length=256 exceeds the model's 128 positions (n_positions); set "
                            "data.max_length <= 128")


@pytest.mark.parametrize("features", ["user", "prompt+user"])
def test_train_refuses_a_user_gate_without_user_ids(tiny_gpt2_dir, tmp_path, features):
    path = tmp_path / "no_users.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "user"}) + "\n" for r in synthetic_rows()))
    with pytest.raises(ValueError) as e:
        train(tiny_gpt2_dir, str(path), tmp_path / "run", **{"gate.kind": "moe", "gate.features": features})
    assert str(e.value) == (f"gate.features={features!r} routes by user, but the data has no 'user' column "
                            "(data.user_column); add user ids, point data.user_column at them, or set "
                            "gate.features=prompt")
