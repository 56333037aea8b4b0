"""Trainer callbacks: hooks at the start and end of training, after every optimizer step, at logging, evaluation
and checkpoint time. Subclass `TrainerCallback`, override what you need, pass `callbacks=[...]` to the trainer.

`on_step_end` sees the step's `StepRecord` (`mixdpo_ds.training.gate_step`): per micro-batch the batch (group and
user ids, dataset row index), the responsibilities q (B, K), the gate's log-weights log w (B, K), the expert
margins, and the step's metrics (0-d tensors, this rank's means; `on_log` gets the means over the logging interval
and all ranks, as floats).

A `transformers.TrainerCallback` (what TRL users have) works too: `CallbackList` wraps it in `HFCallback`, which
calls its hooks the transformers way, `hook(args, state, control, model=..., logs=..., metrics=...)`, with a
`TrainerState` that carries `global_step`, `max_steps`, `epoch` and `log_history`; `control.should_training_stop`
set by a hook stops training after that step.
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


class HFCallback(TrainerCallback):
    """A `transformers.TrainerCallback` behind our hooks (on_train_begin, on_step_begin/on_step_end, on_log,
    on_evaluate, on_save, on_train_end)."""

    def __init__(self, callback):
        from transformers import TrainerControl, TrainerState

        self.callback = callback
        self.state, self.control = TrainerState(), TrainerControl()

    def _sync(self, trainer) -> None:
        s = self.state
        s.global_step, s.max_steps = trainer.step, getattr(trainer, "total_steps", 0)
        t = trainer.cfg.train
        s.logging_steps, s.eval_steps, s.save_steps = t.log_every, t.eval_every, t.save_every
        s.train_batch_size = t.micro_batch_size
        s.is_world_process_zero = s.is_local_process_zero = getattr(trainer, "rank", 0) == 0
        if getattr(trainer, "batches_per_epoch", 0):
            s.epoch = trainer.epoch + trainer.batch_in_epoch / trainer.batches_per_epoch

    def _hook(self, name: str, trainer, **kwargs) -> None:
        self._sync(trainer)
        engine = getattr(trainer, "engine", None)
        kwargs.setdefault("model", engine.module if engine is not None else None)
        kwargs.setdefault("processing_class", getattr(trainer, "tokenizer", None))
        out = getattr(self.callback, name)(getattr(trainer, "args", trainer.cfg), self.state, self.control, **kwargs)
        if out is not None:
            self.control = out
        if self.control.should_training_stop:
            trainer.stop_requested = True

    def on_train_begin(self, trainer) -> None:
        self._hook("on_train_begin", trainer)

    def on_step_end(self, trainer, step, record) -> None:
        self._hook("on_step_begin", trainer)  # our step has run already: both hooks see its end
        self._hook("on_step_end", trainer)

    def on_log(self, trainer, step, metrics) -> None:
        self.state.log_history.append({**metrics, "step": step})
        self._hook("on_log", trainer, logs=dict(metrics))

    def on_evaluate(self, trainer, step, metrics) -> None:
        self._hook("on_evaluate", trainer, metrics={f"eval_{k}": v for k, v in metrics.items()})

    def on_save(self, trainer, step, path) -> None:
        self._hook("on_save", trainer)

    def on_train_end(self, trainer) -> None:
        self._hook("on_train_end", trainer)


def _as_ours(callback) -> TrainerCallback:
    try:
        from transformers import TrainerCallback as HFTrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        return callback
    return HFCallback(callback) if isinstance(callback, HFTrainerCallback) else callback


class CallbackList(TrainerCallback):
    """Calls each callback in order (transformers callbacks through `HFCallback`)."""

    def __init__(self, callbacks=None):
        self.callbacks = [_as_ours(cb) for cb in callbacks or []]

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
