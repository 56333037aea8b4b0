"""train.reference=precompute: the cached reference log-probs equal on-the-fly ones, training on them gives
the losses of training with the frozen reference model, and a second run reuses the cache file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixdpo_ds.model import reference as reference_mod
from mixdpo_ds.training.batch import collate
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.trainer import MixDPOTrainer

from .conftest import base_overrides, train, train_rows

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
RUN = {"experts.num_experts": 2, "train.max_steps": 3, "train.lr": 1e-2, "data.eval_fraction": 0.25,
       "train.export": False}


def test_precomputed_reference(tiny_gpt2_dir, prefs_jsonl, tmp_path, monkeypatch):
    cache = tmp_path / "ref_cache"
    online = train_rows(train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "online", **RUN, **{"train.reference": "model"}))
    cached = train_rows(train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "cached", **RUN, **{
        "train.reference": "precompute", "train.reference_cache_dir": str(cache)}))
    for a, b in zip(online, cached, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a["step"], a["loss"], b["loss"])
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2  # train and eval splits
    mtimes = [f.stat().st_mtime_ns for f in files]

    # Second run: the cache is read, no reference forward runs.
    calls = []
    for cls, name in ((reference_mod.FrozenReference, "forward"), (reference_mod.PolicyReference, "logps")):
        orig = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _orig=orig, **k: calls.append(1) or _orig(self, *a, **k))
    cfg = load_config(CONFIG, base_overrides(tiny_gpt2_dir, prefs_jsonl, tmp_path / "again", **RUN, **{
        "train.reference": "precompute", "train.reference_cache_dir": str(cache)}))
    trainer = MixDPOTrainer(cfg)
    trainer.setup()
    try:
        assert calls == []
        assert [f.stat().st_mtime_ns for f in files] == mtimes
        # ... and the cached table equals the frozen base model's log-probs computed now.
        monkeypatch.undo()
        frozen = reference_mod.FrozenReference(tiny_gpt2_dir)
        for split, examples in (("train", trainer.data.train), ("eval", trainer.data.eval)):
            batch = collate(examples[:6], trainer.tokenizer.pad_token_id)
            B = batch["index"].shape[0]
            want = frozen.logps(batch).view(2, B).T  # (B, 2)
            torch.testing.assert_close(trainer.ref_tables[split][batch["index"]], want, atol=1e-6, rtol=0)
    finally:
        trainer.cleanup()
