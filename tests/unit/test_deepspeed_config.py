"""DeepSpeed config: batch keys derived (train_batch_size = micro × accum × world), conflicts are errors,
gradient clipping always explicit, shipped engine JSONs hold engine settings only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixdpo_ds.training.deepspeed_config import BATCH_KEYS, build_deepspeed_config, resolve_engine_path

DS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
SHIPPED = ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"]


def test_batch_keys_derived():
    """micro 4, accum 3, world 2 → train_batch_size 4·3·2 = 24."""
    ds = build_deepspeed_config({"gradient_clipping": 0.0}, 4, 3, 2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24
    assert ds["bf16"] == {"enabled": False} and ds["zero_optimization"]["stage"] == 0
    assert build_deepspeed_config({"gradient_clipping": 0.0}, 2, 1, 1, dtype="bf16")["bf16"]["enabled"] is True


def test_conflicts_are_errors():
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu=8.*gives 4"):
        build_deepspeed_config({"gradient_clipping": 0.0, "train_micro_batch_size_per_gpu": 8}, 4, 1, 1)
    with pytest.raises(ValueError, match=r"train_batch_size=16.*gives 8"):
        build_deepspeed_config({"gradient_clipping": 0.0, "train_batch_size": 16}, 4, 2, 1)
    with pytest.raises(ValueError, match=r"bf16.enabled=True.*model.dtype='fp32'"):
        build_deepspeed_config({"gradient_clipping": 0.0, "bf16": {"enabled": True}}, 4, 1, 1)
    with pytest.raises(ValueError, match="'optimizer' section"):
        build_deepspeed_config({"gradient_clipping": 0.0, "optimizer": {"type": "Adam"}}, 4, 1, 1)
    with pytest.raises(ValueError, match="fp16"):
        build_deepspeed_config({"gradient_clipping": 0.0, "fp16": {"enabled": True}}, 4, 1, 1)
    # equal values and "auto" are accepted
    engine = {"gradient_clipping": 0.0, "train_batch_size": 8, "gradient_accumulation_steps": "auto"}
    ds = build_deepspeed_config(engine, 4, 2, 1)
    assert ds["gradient_accumulation_steps"] == 2


def test_gradient_clipping_explicit():
    with pytest.raises(ValueError, match="gradient_clipping is not set"):
        build_deepspeed_config({}, 1, 1, 1)
    assert build_deepspeed_config({}, 1, 1, 1, gradient_clipping=0.5)["gradient_clipping"] == 0.5
    assert build_deepspeed_config({"gradient_clipping": 1.0}, 1, 1, 1, gradient_clipping=0)["gradient_clipping"] == 0


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_engine_configs(name):
    raw = json.loads((DS_DIR / f"{name}.json").read_text())
    assert "gradient_clipping" in raw, "DeepSpeed defaults to 1.0 silently: every config sets it"
    assert not set(BATCH_KEYS) & set(raw) and "optimizer" not in raw and "scheduler" not in raw
    assert resolve_engine_path(name) == DS_DIR / f"{name}.json"
    stage = int(name[4])
    ds = build_deepspeed_config(name, 2, 2, 4, zero_stage=None)
    assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 16
    assert build_deepspeed_config(name, 2, 2, 4, zero_stage=1)["zero_optimization"]["stage"] == 1


def test_unknown_engine_config_lists_available():
    with pytest.raises(FileNotFoundError, match=r"available: \[.*'zero2'"):
        resolve_engine_path("zero9")
