"""Experiment trackers of `train.report_to` (MixDPOConfig.report_to), each through its own library, on rank 0.

    tensorboard  torch.utils.tensorboard, output_dir/tb (MetricsLogger writes it, with metrics.jsonl)
    wandb        wandb.init(project=$WANDB_PROJECT or 'mixdpo', name=train.run_name, dir=output_dir, config=the
                 resolved RunConfig); WANDB_MODE=offline writes output_dir/wandb/offline-run-* to sync later
    mlflow       mlflow.start_run(run_name=...) in $MLFLOW_TRACKING_URI (e.g. file:///tmp/mlruns, or a server) under
                 the experiment $MLFLOW_EXPERIMENT_NAME (default 'mixdpo'); params = the flattened RunConfig.
                 mlflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true (its own opt-in)

They are trainer callbacks (training/callbacks.py): `on_log` sends the step's metrics (the same names as
metrics.jsonl: loss, rewards/accuracies, grad_norm, learning_rate, …), `on_evaluate` the `eval/` ones, and
`on_train_end` closes the run. Metric names keep their slashes for wandb; mlflow allows them too.
"""
from __future__ import annotations

import math
import os

from mixdpo_ds.training.callbacks import TrainerCallback


def _scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    return {prefix + k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:250]  # mlflow limits a param value's length
    return out


class _Tracker(TrainerCallback):
    """Starts its run at train begin on rank 0; rank != 0 (and a finished run) sends nothing."""

    active = False

    def on_train_begin(self, trainer) -> None:
        if getattr(trainer, "rank", 0) == 0 and not getattr(trainer, "finished", False) and not self.active:
            self.start(trainer)
            self.active = True

    def on_log(self, trainer, step, metrics) -> None:
        if self.active:
            self.send(step, _scalars(metrics))

    def on_evaluate(self, trainer, step, metrics) -> None:
        if self.active:
            self.send(step, _scalars(metrics, "eval/"))

    def on_train_end(self, trainer) -> None:
        if self.active:
            self.finish()
            self.active = False

    def start(self, trainer) -> None: ...

    def send(self, step: int, values: dict[str, float]) -> None: ...

    def finish(self) -> None: ...


def _run_name(trainer) -> str:
    return trainer.cfg.train.run_name or os.path.basename(os.path.abspath(trainer.cfg.train.output_dir))


class WandbTracker(_Tracker):
    """Weights & Biases; offline with WANDB_MODE=offline (no network, `wandb sync` later)."""

    def start(self, trainer) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mixdpo"), name=_run_name(trainer),
                              dir=str(trainer.out_dir), config=trainer.cfg.to_dict(), reinit="finish_previous")

    def send(self, step, values) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        self.run.finish()


class MlflowTracker(_Tracker):
    """MLflow (mlflow or mlflow-skinny): a local file store (MLFLOW_TRACKING_URI=file:///path) or a server."""

    def start(self, trainer) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "mixdpo"))
        self.run = mlflow.start_run(run_name=_run_name(trainer))
        params = _flatten(trainer.cfg.to_dict())
        items = list(params.items())
        for i in range(0, len(items), 100):  # log_params takes at most 100 per call
            mlflow.log_params(dict(items[i:i + 100]))

    def send(self, step, values) -> None:
        # mlflow metric names allow letters, digits, _ - . space / only
        self.mlflow.log_metrics({k.replace(":", "_"): v for k, v in values.items()}, step=step)

    def finish(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}  # tensorboard: MetricsLogger


def tracker_callbacks(report_to: list[str]) -> list[TrainerCallback]:
    """The tracker callbacks of `train.report_to` (tensorboard is MetricsLogger's, not a callback)."""
    return [TRACKERS[name]() for name in report_to if name in TRACKERS]


__all__ = ["MlflowTracker", "TRACKERS", "WandbTracker", "tracker_callbacks"]
