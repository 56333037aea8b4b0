"""A transformers.TrainerCallback behind our hooks: the transformers call shape, the state it sees, and
control.should_training_stop ending training."""
from __future__ import annotations

from types import SimpleNamespace

from transformers import TrainerCallback as HFTrainerCallback

from mixdpo_ds.training.callbacks import CallbackList, HFCallback, TrainerCallback


class Stopper(HFTrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append((state.global_step, state.max_steps, round(state.epoch, 3), kwargs["model"]))
        if state.global_step == 2:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(("log", dict(logs), len(state.log_history)))


def fake_trainer(step: int):
    cfg = SimpleNamespace(train=SimpleNamespace(log_every=1, eval_every=0, save_every=0, micro_batch_size=4))
    return SimpleNamespace(step=step, total_steps=5, cfg=cfg, rank=0, epoch=0, batch_in_epoch=step,
                           batches_per_epoch=4, engine=SimpleNamespace(module="policy"), tokenizer=None,
                           stop_requested=False)


def test_transformers_callback_sees_steps_logs_and_can_stop_training():
    cb = Stopper()
    callbacks = CallbackList([cb, TrainerCallback()])
    assert isinstance(callbacks.callbacks[0], HFCallback) and type(callbacks.callbacks[1]) is TrainerCallback
    t1, t2 = fake_trainer(1), fake_trainer(2)
    callbacks.on_step_end(t1, 1, None)
    callbacks.on_log(t1, 1, {"loss": 0.5})
    assert not t1.stop_requested
    callbacks.on_step_end(t2, 2, None)
    assert t2.stop_requested
    assert cb.seen == [(1, 5, 0.25, "policy"), ("log", {"loss": 0.5}, 1), (2, 5, 0.5, "policy")]
