"""Non-finite losses and gradients never reach the weights; a diverging loss is reported.

`train.nonfinite`:
- `stop` (default): a non-finite loss or gradient norm (both checked before the optimizer step) stops the run
  with an error naming the step, the micro-batch and its dataset rows. The weights were not updated, so the last
  checkpoint and every weight on disk stay finite.
- `skip`: the whole optimizer step is dropped: its optimizer update does not run (`SkippableAdamW`: parameters and
  moments untouched; the engine then clears the gradients as after any step), the gate is not updated, the skip is
  counted (`nonfinite/skipped_steps` in the metrics) and training goes on with the next batch. ZeRO-0 only: at
  ZeRO ≥ 1 the optimizer step is DeepSpeed's own, where it cannot be skipped.
All ranks agree on each decision (one all-reduce of the step's flags at the accumulation boundary).
"""
from __future__ import annotations

import logging
import math

import torch

from mixdpo_ds.training.distributed import all_reduce_min

log = logging.getLogger("mixdpo_ds")
MODES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    pass


class NonFiniteGuard:
    def __init__(self, mode: str, zero_stage: int, device):
        if mode not in MODES:
            raise ValueError(f"train.nonfinite={mode!r}: allowed {list(MODES)}")
        if mode == "skip" and zero_stage != 0:
            raise ValueError(f"train.nonfinite=skip needs ZeRO-0 (the run uses ZeRO-{zero_stage}, whose optimizer step "
                             "is DeepSpeed's own and is not tested with a skipped update); use train.nonfinite=stop")
        self.mode, self.device, self.skipped = mode, device, 0

    def step_ok(self, losses: list[torch.Tensor], grad_norm: torch.Tensor | None, step: int, batches) -> bool:
        """At the accumulation boundary, before the optimizer step: True when every micro-batch loss of the step
        (and the gradient norm, when known) is finite on every rank; else stop (raise) or return False (skip).
        One all-reduce and one device sync per optimizer step; the backward of a non-finite loss only wrote
        gradients, which the skipped (or never run) optimizer step discards."""
        flags = torch.stack([torch.isfinite(loss.detach()).all() for loss in losses]
                            + ([torch.isfinite(grad_norm)] if grad_norm is not None else [])).float()
        flags = all_reduce_min(flags.to(self.device)).tolist()
        if min(flags) > 0:
            return True
        bad = flags.index(0.0)
        if bad == len(losses):
            return self._bad(f"non-finite gradient norm at step {step + 1}")
        return self._bad(f"non-finite loss {float(losses[bad]):.4g} at step {step + 1}, micro-batch {bad} (dataset "
                         f"rows {batches[bad]['index'].tolist()} on this rank, or another rank's)")

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
