"""Trainer callbacks: hooks at the start and end of training, after every optimizer step, at logging, evaluation
and checkpoint time. Subclass `TrainerCallback`, override what you need, pass `callbacks=[...]` to the trainer.

`on_step_end` sees the step's `StepRecord` (`mixdpo_ds.training.gate_step`): per micro-batch the batch (group and
user ids, dataset row index), the responsibilities q (B, K), the gate's log-weights log w (B, K), the expert
margins, and the step's metrics (0-d tensors, this rank's means; `on_log` gets the means over the logging interval
and all ranks, as floats).
"""
from __future__ import annotations

from pathlib import Path


class TrainerCallback:
    """No-op hooks; every hook receives the trainer first."""

    def on_train_begin(self, trainer) -> None: ...

    def on_step_end(self, trainer, step: int, record) -> None: ...

    def on_log(self, trainer, step: int, metrics: dict[str, float]) -> None: ...

    def on_evaluate(self, trainer, step: int, metrics: dict[str, float]) -> None: ...

    def on_save(self, trainer, step: int, path: Path) -> None: ...

    def on_train_end(self, trainer) -> None: ...


class CallbackList(TrainerCallback):
    """Calls each callback in order."""

    def __init__(self, callbacks=None):
        self.callbacks = list(callbacks or [])

    def _call(self, name: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(*args)

    def on_train_begin(self, trainer) -> None:
        self._call("on_train_begin", trainer)

    def on_step_end(self, trainer, step, record) -> None:
        self._call("on_step_end", trainer, step, record)

    def on_log(self, trainer, step, metrics) -> None:
        self._call("on_log", trainer, step, metrics)

    def on_evaluate(self, trainer, step, metrics) -> None:
        self._call("on_evaluate", trainer, step, metrics)

    def on_save(self, trainer, step, path) -> None:
        self._call("on_save", trainer, step, path)

    def on_train_end(self, trainer) -> None:
        self._call("on_train_end", trainer)
