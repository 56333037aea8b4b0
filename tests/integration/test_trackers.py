"""report_to trackers through their own libraries (tensorboard, wandb offline, an mlflow file store) get every
step's metrics; our callbacks and a transformers TrainerCallback see every step."""
from __future__ import annotations

import glob

import pytest

pytestmark = pytest.mark.integration

STEPS = 3
KEYS = ("rewards/accuracies", "grad_norm", "loss", "learning_rate")


class Counter:
    def __init__(self):
        self.steps, self.logs = [], []

    def on_train_begin(self, trainer): ...

    def on_step_end(self, trainer, step, record):
        self.steps.append(step)

    def on_log(self, trainer, step, metrics):
        self.logs.append(step)

    def on_evaluate(self, trainer, step, metrics): ...

    def on_save(self, trainer, step, path): ...

    def on_train_end(self, trainer): ...


def _wandb_history(run_dir: str) -> list[dict]:
    """The history rows of an offline run's .wandb file. wandb 0.31 has no Python reader any more (its core is
    Go), so this reads the LevelDB-style log it writes: a 7-byte header (':W&B', magic, version), 32 KiB blocks of
    records (crc 4, length 2, type 1: full / first / middle / last), each payload a wandb_internal_pb2.Record."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, payloads, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            payloads.append(buf)
            buf = b""
    rows = []
    for payload in payloads:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


@pytest.fixture(scope="module")
def tracked(tiny_gpt2_dir, tiny_tokenizer, tmp_path_factory):
    from datasets import Dataset
    from transformers import TrainerCallback

    from mixdpo_ds import MixDPOConfig, MixDPOTrainer

    class HFCounter(TrainerCallback):
        def __init__(self):
            self.steps, self.logs = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    root = tmp_path_factory.mktemp("trackers")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("MLFLOW_TRACKING_URI", f"file://{root}/mlruns")
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.x keeps the file store behind this opt-in
    rows = [{"prompt": f"Q{i}:", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(8)]
    ours, hf = Counter(), HFCounter()
    args = MixDPOConfig(output_dir=str(root / "run"), report_to=["tensorboard", "wandb", "mlflow"], max_steps=STEPS,
                        per_device_train_batch_size=4, num_experts=2, max_length=64, learning_rate=1e-2,
                        run_name="tracked", plots=False)
    trainer = MixDPOTrainer(model=tiny_gpt2_dir, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tiny_tokenizer, callbacks=[ours, hf])
    trainer.train()
    yield trainer, root, ours, hf
    trainer.cleanup()
    mp.undo()


def test_callbacks_see_every_step(tracked):
    _, _, ours, hf = tracked
    assert ours.steps == ours.logs == list(range(1, STEPS + 1))
    assert hf.steps == list(range(1, STEPS + 1))
    assert len(hf.logs) == STEPS and all(set(KEYS) <= set(log) for log in hf.logs)


def test_wandb_offline_run_has_the_step_metrics(tracked):
    _, root, _, _ = tracked
    rows = [r for r in _wandb_history(str(root / "run")) if "loss" in r]
    assert [r["_step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(set(KEYS) <= set(r) for r in rows)


def test_mlflow_file_store_has_the_step_metrics(tracked):
    from mlflow.tracking import MlflowClient

    _, root, _, _ = tracked
    client = MlflowClient(tracking_uri=f"file://{root}/mlruns")
    (exp,) = [e for e in client.search_experiments() if e.name == "mixdpo"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tracked" and run.data.params["experts.num_experts"] == "2"
    for key in KEYS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, STEPS + 1)), key


def test_tensorboard_has_the_step_metrics(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, root, _, _ = tracked
    acc = EventAccumulator(str(root / "run" / "tb"))
    acc.Reload()
    for key in KEYS:
        assert [e.step for e in acc.Scalars(key)] == list(range(1, STEPS + 1)), key
