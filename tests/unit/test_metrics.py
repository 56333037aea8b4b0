"""MetricAccumulator means over a logging interval; MetricsLogger writes, truncates on resume, plots."""
from __future__ import annotations

import json

import pytest
import torch

from mixdpo_ds.training.metrics import MetricAccumulator, MetricsLogger, plot_metrics, read_metrics


def test_accumulator_means_and_reset():
    """loss 1 then 3 → mean 2; accuracy 0 then 1 → 0.5."""
    acc = MetricAccumulator()
    acc.add({"loss": torch.tensor(1.0), "accuracy": torch.tensor(0.0)})
    acc.add({"loss": torch.tensor(3.0), "accuracy": 1.0})
    assert acc.reduce() == {"loss": 2.0, "accuracy": 0.5}
    assert acc.reduce() == {}
    acc.add({"loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="metric names changed"):
        acc.add({"elbo": torch.tensor(1.0)})


def test_logger_truncates_on_resume_and_plots(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0 / step, "resp/mean_0": 0.4, "resp/mean_1": 0.6, "gate/w_0": 0.5})
    log.log(3, {"loss": 0.2}, prefix="eval/")
    resumed = MetricsLogger(tmp_path, truncate_after=2)  # the run resumes from a step-2 checkpoint
    resumed.log(3, {"loss": 0.3})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("loss")) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.3)]
    MetricsLogger(tmp_path)  # a fresh run owns its file
    assert not (tmp_path / "metrics.jsonl").exists()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_metrics(tmp_path / "metrics.jsonl", tmp_path)
    assert [p.name for p in written] == ["loss.png", "responsibilities.png"]


def test_collapse_watch_keeps_a_window_of_recent_pairs():
    from mixdpo_ds.training.metrics import CollapseWatch

    watch = CollapseWatch(window=10)
    assert watch.metrics() == {} and watch.summary() is None
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # 4 steps of 4 pairs: the oldest step drops out once 10 newer pairs are held
        m = torch.randn(4, 1, generator=g)
        watch.add(torch.cat([m, m], 1), torch.full((4, 2), 0.5), torch.full((4, 2), 0.5))
    assert sum(p[0].shape[0] for p in watch.parts) == 12 and watch.recent()[0].shape == (10, 2)
    metrics = watch.metrics()
    assert metrics["collapse/merged_pairs"] == 1.0 and metrics["collapse/max_margin_corr"] == pytest.approx(1.0)
    assert "merged experts [(0, 1)]" in watch.summary()
