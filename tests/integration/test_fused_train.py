"""`loss.fused` (the policy loss inside the heads' forward, no logits recompute; training/fused_step.py) trains the
same run as the separate path (log-probs, then the loss): per-step losses, gate metrics and final weights agree,
for dense and low-rank heads, a frozen and a trainable trunk, a closed-form and a learned prompt gate, the random
warm-up and gradient accumulation. And `always` names what it cannot fuse."""
from __future__ import annotations

import pytest
import torch

from mixdpo_ds import cli

from .conftest import base_overrides, train, train_rows
from .test_train import trained_policy

pytestmark = pytest.mark.integration

CASES = {
    "dense_frozen_mix": {"experts.num_experts": 3, "gate.kind": "mix", "em.warmup_random_steps": 2},
    "lowrank_frozen_moe": {"experts.num_experts": 3, "experts.head_rank": 4, "gate.kind": "moe",
                           "gate.features": "prompt", "train.grad_accum": 2},
    "dense_trainable_moe": {"experts.num_experts": 2, "experts.trunk": "trainable", "gate.kind": "moe",
                            "gate.features": "prompt"},
}
COMPARED = ("loss", "policy_loss", "gate_loss", "rewards/margins", "resp/entropy")


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_separate(case, tiny_gpt2_dir, prefs_jsonl, tmp_path):
    # adam_epsilon 1e-4, not 1e-8: AdamW's first step moves a weight by lr · g / (|g| + ε), so with ε = 1e-8 a
    # gradient of ~1e-8 (rounding noise of the two summation orders) moves it by a large fraction of lr
    extra = {"train.max_steps": 4, "train.lr": 1e-2, "train.save_every": 4, "train.micro_batch_size": 4,
             "loss.beta": 0.5, "train.adam_epsilon": 1e-4, **CASES[case]}
    runs = {mode: tmp_path / mode for mode in ("never", "always")}
    rows = {mode: train_rows(train(tiny_gpt2_dir, prefs_jsonl, run, **extra, **{"loss.fused": mode}))
            for mode, run in runs.items()}
    assert len(rows["never"]) == len(rows["always"]) == 4
    for a, b in zip(rows["never"], rows["always"], strict=True):
        for key in COMPARED:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (case, a["step"], key)
    (_, separate), (_, fused) = trained_policy(runs["never"]), trained_policy(runs["always"])
    # weights after 4 AdamW steps: an update moves by up to lr/ε = 100× a gradient's rounding difference, and a
    # later step's gradient feeds on the earlier weights, so the two summation orders drift by a few 1e-5 on some
    # CPUs (seen: 3.2e-5 on 9 of 5940 elements); a wrong gradient moves a weight by ~lr = 1e-2 a step, 100× atol
    moved = 0
    for (name, p), q in zip(separate.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{case} {name}: {m}")
        moved += p.requires_grad
    assert moved > 0


def test_fused_always_names_the_reason(tiny_gpt2_dir, prefs_jsonl, tmp_path, capsys):
    over = base_overrides(tiny_gpt2_dir, prefs_jsonl, tmp_path / "run", **{
        "loss.fused": "always", "em.mode": "gumbel", "train.max_steps": 1})
    config = str(__import__("pathlib").Path(cli.__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    with pytest.raises(ValueError, match=r"loss.fused='always' cannot apply: em.mode='gumbel'"):
        cli.main(["train", "--config", config, *over])
