"""Metrics: accumulate scalar tensors without per-metric syncs, write metrics.jsonl / TensorBoard, plot.

The loss functions return their diagnostics as 0-d tensors. `MetricAccumulator.add` stacks them into one
vector and adds it to a running sum on the device, so nothing leaves the device until `reduce()`, which
moves the mean over the interval in one `.tolist()` (and, with several ranks, one all_reduce).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mixdpo_ds.training.distributed import all_reduce_mean


class MetricAccumulator:
    """Running means of named scalar tensors over a logging interval."""

    def __init__(self):
        self.names: list[str] | None = None
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        names = list(metrics)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(f"metric names changed within a logging interval: {self.names} -> {names}")
        ref = next((v for v in metrics.values() if torch.is_tensor(v)), None)
        device = ref.device if ref is not None else "cpu"
        vec = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().float().reshape(())
                           for v in metrics.values()])  # (M,)
        self.total = vec if self.total is None else self.total + vec
        self.count += 1

    def reduce(self, all_ranks: bool = True) -> dict[str, float]:
        """Means over the interval (and over ranks when distributed), then reset. {} if nothing was added."""
        if self.total is None:
            return {}
        mean = self.total / self.count
        if all_ranks:
            mean = all_reduce_mean(mean)  # identity on one rank
        out = dict(zip(self.names, mean.tolist(), strict=True))
        self.names, self.total, self.count = None, None, 0
        return out


class MetricsLogger:
    """metrics.jsonl (one JSON object per line, with `step`) and optional TensorBoard, on rank 0 only."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = False, enabled: bool = True,
                 truncate_after: int | None = None):
        """`truncate_after`: on resume, drop lines with step > this (written after the checkpoint)."""
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif truncate_after is None and self.path.exists():
            self.path.unlink()  # a fresh run owns its metrics file
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.enabled or not metrics:
            return
        row = {"step": step, **{prefix + k: v for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png (train and eval loss) and responsibilities.png (resp/mean_k and gate/w_k) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    written = []
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    if train or evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png")
        plt.close(fig)
        written.append(out_dir / "loss.png")
    resp_keys = sorted({k for r in train for k in r if k.startswith("resp/mean_")})
    if resp_keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in resp_keys:
            k = key.rsplit("_", 1)[1]
            line, = ax.plot([r["step"] for r in train], [r.get(key, float("nan")) for r in train],
                            label=f"resp expert {k}")
            wkey = f"gate/w_{k}"
            if any(wkey in r for r in train):
                ax.plot([r["step"] for r in train], [r.get(wkey, float("nan")) for r in train], "--",
                        color=line.get_color(), label=f"w expert {k}")
        ax.set_xlabel("step")
        ax.set_ylabel("mean responsibility / gate weight")
        ax.set_ylim(0, 1)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_dir / "responsibilities.png")
        plt.close(fig)
        written.append(out_dir / "responsibilities.png")
    return written


class CollapseWatch:
    """The collapse detectors (core/collapse.py) over the most recent `window` training pairs: logged at every log
    step as `collapse/*` and summarised at the end of training. One batch is too few pairs for a verdict, so the
    window spans steps (with several ranks: this rank's pairs)."""

    def __init__(self, window: int = 512):
        self.window, self.parts = window, []

    def add(self, margins: torch.Tensor, resp: torch.Tensor, w: torch.Tensor) -> None:
        self.parts.append(tuple(t.detach() for t in (margins, resp, w)))  # stays on the device: no sync per step
        while sum(p[0].shape[0] for p in self.parts[1:]) >= self.window:
            self.parts.pop(0)

    def recent(self) -> list[torch.Tensor]:
        """[margins (N, K), resp (N, K), w (N, K)] of the most recent N ≤ `window` pairs, fp32 on the CPU."""
        return [torch.cat([p[i] for p in self.parts])[-self.window:].float().cpu() for i in range(3)]

    def reset(self) -> None:
        self.parts = []

    def metrics(self) -> dict[str, float]:
        from mixdpo_ds.core.collapse import collapse_metrics

        return collapse_metrics(*self.recent()) if self.parts else {}

    def summary(self) -> str | None:
        """A warning line when a detector fires on the final window, else None."""
        from mixdpo_ds.core.collapse import collapse_report

        if not self.parts:
            return None
        report = collapse_report(*self.recent())
        if not (report["merged"] or report["dead"] or report["saturated"]):
            return None
        return (f"mixture collapse in the last {min(self.window, sum(p[0].shape[0] for p in self.parts))} training "
                f"pairs: merged experts {report['merged']}, dead experts {report['dead']}, gate saturated "
                f"{report['saturated']} (docs: mixdpo_ds/core/collapse.py)")
