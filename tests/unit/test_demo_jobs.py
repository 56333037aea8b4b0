"""`mixdpo_ds.apps.demo.run_all`: the per-seed job graph (prepare → one job per run → finish) and its arguments.

The jobs are replaced by fakes that record their calls, so this checks the scheduling on the inline executor
(workers=1); the real jobs on 2 spawned workers run in tests/integration/test_demo.py."""
from __future__ import annotations

import pytest

from mixdpo_ds.apps import demo


def test_run_all_runs_every_seeds_graph_in_dependency_order(monkeypatch, tmp_path):
    calls = []

    def prepare(cfg, seed, tok):
        calls.append(("prepare", seed))
        return {"seed": seed, "sft_loss": [4.0, 1.0]}

    def run(cfg, prep, name, task, K, gate, overrides):
        assert ("prepare", prep["seed"]) in calls  # a run only starts after its seed's data + SFT
        calls.append(("run", prep["seed"], name))
        return {"metrics": {"mixture": {"all": 0.5}, "recovery": 0.4}, "seconds": 0.0, "K": K, "task": task}

    def finish(cfg, prep, runs, tok):
        calls.append(("finish", prep["seed"]))
        return {"seed": prep["seed"], "runs": sorted(runs)}

    monkeypatch.setattr(demo, "prepare_seed", prepare)
    monkeypatch.setattr(demo, "run_job", run)
    monkeypatch.setattr(demo, "finish_seed", finish)
    cfg = demo.DemoConfig(out=str(tmp_path), seeds=2, workers=1, progress_bar=False)
    results = demo.run_all(cfg, "tok", 0.0)

    names = [p[0] for p in demo.run_plan(cfg)]
    assert names[0] == "mixdpo" and set(names) == {"mixdpo", "dpo_multi", "dpo_ctx", "moedpo", "moe_user"}
    assert [r["seed"] for r in results] == [0, 1]
    assert all(r["runs"] == sorted(names) for r in results)
    for seed in (0, 1):
        order = [c for c in calls if c[1] == seed]
        assert order[0] == ("prepare", seed) and order[-1] == ("finish", seed)
        assert [c[2] for c in order[1:-1]] == names


def test_budgets_and_bad_config():
    cfg = demo.DemoConfig()
    assert cfg.budget("multi", "mix") == (cfg.steps, cfg.batch_size)
    assert cfg.budget("contextual", "moe") == cfg.budget("multi", "moe") == (cfg.ctx_steps, cfg.ctx_batch_size)
    fast = demo.DemoConfig(fast=True)
    assert fast.budget("multi", "mix") == fast.budget("contextual", "mix") == (80, 32)
    with pytest.raises(ValueError, match="demo.workers must be >= 1"):
        demo.DemoConfig(workers=0)
