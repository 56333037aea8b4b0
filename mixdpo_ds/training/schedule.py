"""The learning-rate schedule: `transformers.get_scheduler`, every schedule name it has (train.lr_schedule /
MixDPOConfig.lr_scheduler_type), one multiplier for the policy's optimizer and the gate's.

    warm-up   train.warmup_steps (an integer; a float in (0, 1) is a ratio of the steps, as in transformers 5),
              else ceil(train.warmup_ratio × steps)
    schedule  get_scheduler(name, optimizer, num_warmup_steps, num_training_steps,
                            scheduler_specific_kwargs=train.lr_scheduler_kwargs)

'constant' with a warm-up runs as 'constant_with_warmup' (transformers' 'constant' would ignore the warm-up).
'reduce_lr_on_plateau' is not offered: it steps on an evaluation metric, not on the optimizer step. Note that
transformers' warm-up starts at 0 (multiplier s / warmup at step s), so the first step of a warm-up makes no change.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
             "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")


def warmup_steps_of(train_cfg, total_steps: int) -> int:
    """The warm-up in optimizer steps (see the module docstring)."""
    w = train_cfg.warmup_steps
    if w >= 1:
        return int(w)
    ratio = w if w > 0 else train_cfg.warmup_ratio
    return min(total_steps, math.ceil(ratio * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg, total_steps: int):
    """transformers.get_scheduler for `optimizer` with the run's schedule, warm-up and kwargs."""
    from transformers import get_scheduler

    warmup = warmup_steps_of(train_cfg, total_steps)
    name = train_cfg.lr_schedule
    if name == "constant" and warmup > 0:
        name = "constant_with_warmup"
    kwargs = dict(train_cfg.lr_scheduler_kwargs or {})
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                             scheduler_specific_kwargs=kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"train.lr_schedule={train_cfg.lr_schedule!r} with train.lr_scheduler_kwargs={kwargs}: "
                         f"{e}") from e


def lr_multiplier(train_cfg, total_steps: int) -> Callable[[int], float]:
    """The schedule as a function of the step (multiplier of the base lr), for the gate's own optimizer."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(probe, train_cfg, total_steps)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(f"train.lr_schedule={train_cfg.lr_schedule!r} is not a per-step schedule")
    return scheduler.lr_lambdas[0]


__all__ = ["SCHEDULES", "build_scheduler", "lr_multiplier", "warmup_steps_of"]
