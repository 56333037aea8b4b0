"""Non-finite losses and gradients never reach the weights; a diverging loss is reported.

`train.nonfinite`:
- `stop` (default): a non-finite loss (checked before its backward) or gradient norm (checked before the optimizer
  step) stops the run with an error naming the step, the micro-batch and its dataset rows. The weights were not
  updated, so the last checkpoint and every weight on disk stay finite.
- `skip`: the whole optimizer step is dropped: the step's gradients are discarded before the optimizer runs (AdamW
  skips parameters without a gradient, its moments included), the gate is not updated, the skip is counted
  (`nonfinite/skipped_steps` in the metrics) and training goes on with the next batch. ZeRO-0 only: at ZeRO ≥ 1
  the gradients live in DeepSpeed's partitions, where they cannot be discarded.
All ranks agree on each decision (one all-reduce of a flag per micro-batch).
"""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("mixdpo_ds")
MODES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    pass


def all_ranks_true(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


class NonFiniteGuard:
    def __init__(self, mode: str, zero_stage: int, device):
        if mode not in MODES:
            raise ValueError(f"train.nonfinite={mode!r}: allowed {list(MODES)}")
        if mode == "skip" and zero_stage != 0:
            raise ValueError(f"train.nonfinite=skip needs ZeRO-0 (the run uses ZeRO-{zero_stage}, whose partitioned "
                             "gradients cannot be discarded); use train.nonfinite=stop")
        self.mode, self.device, self.skipped = mode, device, 0

    def loss_ok(self, loss: torch.Tensor, step: int, micro: int, batch: dict) -> bool:
        """True when every rank's micro-batch loss is finite; else stop (raise) or return False (skip)."""
        if all_ranks_true(bool(torch.isfinite(loss.detach()).all()), self.device):
            return True
        return self._bad(f"non-finite loss {float(loss):.4g} at step {step + 1}, micro-batch {micro} (dataset rows "
                         f"{batch['index'].tolist()} on this rank, or another rank's)")

    def grad_norm_ok(self, norm: torch.Tensor | None, step: int) -> bool:
        if norm is None or all_ranks_true(bool(torch.isfinite(norm)), self.device):
            return True
        return self._bad(f"non-finite gradient norm at step {step + 1}")

    def _bad(self, what: str) -> bool:
        if self.mode == "stop":
            raise NonFiniteError(f"{what}: stopped before the weights were updated, so they and every checkpoint "
                                 "stay finite. Lower train.lr, check the data, or set train.nonfinite=skip to drop "
                                 "such steps.")
        log.warning("%s: step skipped (train.nonfinite=skip)", what)
        return False

    def skip_step(self) -> None:
        self.skipped += 1


class DivergenceWatch:
    """Warns once when the logged loss grows past `factor` × the first logged loss (and past 1.0)."""

    def __init__(self, factor: float = 10.0):
        self.factor, self.first, self.warned = factor, None, False

    def update(self, step: int, loss: float, lr: float) -> None:
        if not math.isfinite(loss):
            return
        if self.first is None:
            self.first = loss
        elif not self.warned and loss > max(1.0, self.factor * self.first):
            self.warned = True
            log.warning("loss %.4g at step %d is %.0f× the first logged loss %.4g: the run looks divergent "
                        "(train.lr=%.3g); lower the learning rate", loss, step, loss / self.first, self.first, lr)
