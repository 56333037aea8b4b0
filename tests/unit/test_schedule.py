"""The lr schedule is transformers.get_scheduler (every per-step schedule name), with hand-computed multipliers;
gradient checkpointing leaves the gradients as they are; an unset lr on full models warns."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from mixdpo_ds.training.config import TrainConfig, load_config
from mixdpo_ds.training.schedule import SCHEDULES, build_scheduler, lr_multiplier, warmup_steps_of

KWARGS = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
          "warmup_stable_decay": {"num_decay_steps": 3}}


def test_every_per_step_schedule_of_transformers():
    from transformers.trainer_utils import SchedulerType

    assert set(SCHEDULES) == {s.value for s in SchedulerType} - {"reduce_lr_on_plateau", "greedy"}
    for name in SCHEDULES:
        t = TrainConfig(lr_schedule=name, warmup_steps=2, lr_scheduler_kwargs=KWARGS.get(name, {}))
        fn = lr_multiplier(t, 10)
        assert all(math.isfinite(fn(s)) for s in range(10)), name


def test_multipliers_by_hand():
    lin = lr_multiplier(TrainConfig(lr_schedule="linear", warmup_steps=2), 10)
    cos = lr_multiplier(TrainConfig(lr_schedule="cosine", warmup_steps=2), 10)
    const = lr_multiplier(TrainConfig(lr_schedule="constant", warmup_steps=2), 10)  # runs with its warm-up
    assert [lin(s) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])  # (10 - s) / 8
    assert [cos(s) for s in (2, 6, 10)] == pytest.approx([1.0, 0.5, 0.0])  # ½(1 + cos(π (s - 2) / 8))
    assert [const(s) for s in (0, 1, 2, 9)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert lr_multiplier(TrainConfig(), 10)(0) == 1.0  # constant, no warm-up: the old default unchanged


def test_warmup_steps_ratio_forms():
    assert warmup_steps_of(TrainConfig(warmup_ratio=0.25), 10) == 3  # ceil(2.5)
    assert warmup_steps_of(TrainConfig(warmup_steps=0.25), 10) == 3  # transformers 5: a float < 1 is a ratio
    assert warmup_steps_of(TrainConfig(warmup_steps=4, warmup_ratio=0.5), 10) == 4
    with pytest.raises(ValueError, match="train.warmup_steps"):
        TrainConfig(warmup_steps=2.5)
    with pytest.raises(ValueError, match="train.lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_policy_scheduler_follows_the_same_multiplier():
    t = TrainConfig(lr_schedule="cosine", warmup_steps=1, lr=0.1)
    opt = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=t.lr)
    sched, fn = build_scheduler(opt, t, 5), lr_multiplier(t, 5)
    seen = []
    for _ in range(5):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * fn(s) for s in range(5)])


def test_unset_lr_warns_for_full_models_only():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        heads = load_config(None, ["model_name_or_path=/m"])
        models = load_config(None, ["model_name_or_path=/m", "expert_kind=models"])
        explicit = load_config(None, ["model_name_or_path=/m", "expert_kind=models", "learning_rate=1e-6"])
    assert heads.train.lr == models.train.lr == 1e-4 and explicit.train.lr == 1e-6
    messages = [str(w.message) for w in seen if "train.lr" in str(w.message)]
    assert len(messages) == 1 and "experts.kind='models'" in messages[0]


def test_gradient_checkpointing_keeps_the_gradients(tiny_gpt2_dir):
    from mixdpo_ds.model.experts import ExpertsConfig, build_policy
    from mixdpo_ds.training.build import enable_gradient_checkpointing

    ids = torch.tensor([[5, 9, 11, 3, 7], [4, 8, 2, 6, 10]])
    mask, labels = torch.ones_like(ids), ids.clone()
    labels[:, :2] = -100
    grads = []
    for checkpoint in (False, True):
        policy = build_policy(tiny_gpt2_dir, ExpertsConfig(kind="models", num_experts=2), seed=0).train()
        if checkpoint:
            models = enable_gradient_checkpointing(policy)
            assert len(models) == 2 and all(m.is_gradient_checkpointing for m in models)
        policy(ids, mask, labels).logps.sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)
