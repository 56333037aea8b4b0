"""`mixdpo train` with low-rank expert heads (`experts.head_rank`) end to end: the loss falls, every trainable
parameter (A_k, B_k) changes, the frozen trunk and base head do not, and each exported expert (W + A_k B_k merged,
reloaded with from_pretrained) gives the trained policy's log-probs."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mixdpo_ds.model.experts import build_policy

from .conftest import train, train_rows
from .test_train import check_export_logps, trained_policy

pytestmark = pytest.mark.integration


def test_mixdpo_lowrank_heads_k3(tiny_gpt2_dir, prefs_by_prompt_jsonl, tmp_path):
    run = tmp_path / "lowrank"
    rows = train_rows(train(tiny_gpt2_dir, prefs_by_prompt_jsonl, run, **{
        "experts.kind": "heads", "experts.num_experts": 3, "experts.head_rank": 4, "experts.init_noise": 0.05,
        "gate.kind": "mix", "train.max_steps": 10, "train.lr": 3e-2, "train.micro_batch_size": 8, "loss.beta": 0.5}))
    assert len(rows) == 10 and all(math.isfinite(r["loss"]) for r in rows)
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.1, (first, last)
    _, policy = trained_policy(run)
    initial = build_policy(tiny_gpt2_dir, policy.cfg, seed=0)
    for name in ("up", "down"):
        assert not torch.equal(getattr(policy.lowrank_heads, name), getattr(initial.lowrank_heads, name)), name
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    for k in range(3):
        exported = load_file(run / "export" / f"expert_{k}" / "model.safetensors")
        assert not torch.equal(exported["lm_head.weight"], base.lm_head.weight), k
        assert torch.equal(exported["transformer.h.0.attn.c_attn.weight"], base.transformer.h[0].attn.c_attn.weight)
    check_export_logps(run, 3)
