"""Split-and-merge repair of a collapsed mixture during training (docs/math.md §12).

Every `em.split_every` optimizer steps the trainer runs the collapse detectors (core/collapse.py) on its window of
recent training pairs. Each dead expert, and the second expert of each merged pair, is re-seeded by splitting the
most loaded expert that is not itself being re-seeded (split-and-merge EM):

    policy   expert `dead` ← expert `source` + ε, ε ~ N(0, (em.split_noise · std(source))²); its AdamW moments ←
             the source's, so both continue from the same optimizer state
    gate     Mix: w'_source = w'_dead = w_source / 2 (the dead expert's own mass dropped), floored at gate.w_min;
             MoE: the output layer's row `dead` ← row `source` and both biases − log 2, which is the same split of
             the source's mass for every input

Rank 0 decides (its window) and broadcasts the plan, so every rank splits the same experts; the noise comes from a
generator seeded by (train.seed, step), so a resumed run repairs exactly as an uninterrupted one. At most
`em.split_max` splits per run. Supported for `heads` experts with full heads (the (K, V, H) parameter); ZeRO 1–3
through DeepSpeed's public safe_get/set_full_fp32_param API.
"""
from __future__ import annotations

import logging
import math

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from mixdpo_ds.core.collapse import collapse_report, split_expert, split_responsibility, split_source
from mixdpo_ds.model.gating import MixGate, MoEGate

log = logging.getLogger("mixdpo_ds")
ADAM_STATES = ("exp_avg", "exp_avg_sq")


def check_repairable(policy, split_every: int) -> None:
    """Refuse `em.split_every` where the split is not implemented, naming the key."""
    if split_every and getattr(policy, "heads", None) is None:
        raise ValueError("em.split_every > 0 needs experts.kind=heads with full heads (experts.head_rank=null, "
                         "experts.ep_size=1); set em.split_every=0 for this run")


def plan_splits(report: dict, resp: torch.Tensor) -> list[tuple[int, int]]:
    """(dead, source) pairs from a `collapse_report`: every dead expert, then the later expert of each merged pair;
    each source is the most loaded expert (mean responsibility) that is not being re-seeded."""
    targets: list[int] = []
    for k in list(report["dead"]) + [k for _, k in report["merged"]]:
        if k not in targets:
            targets.append(k)
    K = resp.shape[-1]
    targets = targets[:K - 1]  # at least one expert keeps its weights
    return [(k, split_source(resp, exclude=targets)) for k in targets]


def _broadcast_plan(plan: list[tuple[int, int]], K: int, device) -> list[tuple[int, int]]:
    """Rank 0's plan on every rank ((2K,) int tensor, −1 padded)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return plan
    flat = torch.full((2 * K,), -1, dtype=torch.long, device=device)
    for i, (d, s) in enumerate(plan):
        flat[2 * i], flat[2 * i + 1] = d, s
    torch.distributed.broadcast(flat, src=0)
    pairs = flat.view(K, 2).tolist()
    return [(d, s) for d, s in pairs if d >= 0]


@torch.no_grad()
def _split_param(param: nn.Parameter, optimizer, dead: int, source: int, noise: float, gen) -> None:
    """Row `dead` of a (K, …) parameter ← row `source` (+ noise), with its Adam moments; any ZeRO stage."""
    full = safe_get_full_fp32_param(param)
    zero = full is not None
    value = (full if zero else param.data).clone()
    split_expert(value, dead, source, noise, generator=gen)
    if zero:
        safe_set_full_fp32_param(param, value)
    else:
        param.data.copy_(value)
    for key in ADAM_STATES:
        state = safe_get_full_optimizer_state(param, key) if zero else optimizer.state.get(param, {}).get(key)
        if state is None:
            continue
        state = state.clone()
        state[dead] = state[source]
        if zero:
            safe_set_full_optimizer_state(param, state, key)
        else:
            optimizer.state[param][key].copy_(state)


@torch.no_grad()
def _split_gate(gate, gate_optimizer, dead: int, source: int) -> None:
    if isinstance(gate, MixGate):
        w = split_responsibility(gate.log_w.exp(), dead, source, log=False).clamp_min(max(gate.cfg.w_min, 1e-12))
        gate.log_w.copy_((w / w.sum()).log())
    elif isinstance(gate, MoEGate):
        last = gate.net if isinstance(gate.net, nn.Linear) else gate.net[-1]
        last.weight[dead] = last.weight[source]
        last.bias[source] -= math.log(2.0)
        last.bias[dead] = last.bias[source]
        if gate_optimizer is not None:
            for p in (last.weight, last.bias):
                for key in ADAM_STATES:
                    if key in gate_optimizer.state.get(p, {}):
                        gate_optimizer.state[p][key][dead] = gate_optimizer.state[p][key][source]


class SplitRepair:
    """The trainer's repair (`em.split_*`): `maybe_split(trainer, step)` after each optimizer step; `splits` is saved
    in the trainer state. Checks are made after the random warm-up (`em.warmup_random_steps`)."""

    def __init__(self, policy, em, seed: int):
        check_repairable(policy, em.split_every)
        self.every, self.noise, self.max_splits = em.split_every, em.split_noise, em.split_max
        self.start, self.seed, self.splits = em.warmup_random_steps, seed, 0

    def due(self, step: int) -> bool:
        return bool(self.every) and self.splits < self.max_splits and step > self.start and step % self.every == 0

    def maybe_split(self, trainer, step: int) -> list[tuple[int, int]]:
        """Detect on rank 0's window, split on every rank; returns the (dead, source) pairs applied."""
        if not self.due(step) or not trainer.collapse.parts:
            return []
        margins, resp, w = trainer.collapse.recent()
        plan = plan_splits(collapse_report(margins, resp, w), resp) if trainer.rank == 0 else []
        plan = _broadcast_plan(plan, trainer.K, trainer.device)[: self.max_splits - self.splits]
        if not plan:
            return []
        policy = trainer.engine.module
        gen = torch.Generator(device=policy.heads.device).manual_seed(self.seed * 1_000_003 + step)
        for dead, source in plan:
            _split_param(policy.heads, trainer.optimizer, dead, source, self.noise, gen)
            _split_gate(trainer.gate, trainer.gate_step.optimizer, dead, source)
            log.warning("step %d: mixture collapse: expert %d re-seeded by splitting expert %d (copy + noise "
                        "%.3g·std, its gate mass shared; docs/math.md §12)", step, dead, source, self.noise)
        self.splits += len(plan)
        trainer.collapse.reset()  # the old window describes the experts before the split
        return plan
