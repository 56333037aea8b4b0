"""Ranked data through the real recipe (docs/math.md §15): m = 2 ranked rows reproduce the pair path exactly (loss,
every gradient, the logged metrics of a short run with its gate step), and m = 3 rankings train end to end through
`mixdpo train --config configs/rankings.yaml` and `mixdpo evaluate`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixdpo_ds import cli
from mixdpo_ds.apps.datasets.rankings import GROUPS, RankedReviewsConfig, write_ranked_task
from mixdpo_ds.training.batch import as_pairs
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.trainer import MixDPOTrainer

from .conftest import base_overrides, read_rows, synthetic_rows, train_rows

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
RANKINGS = CONFIG.with_name("rankings.yaml")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ranked_pairs(rows: list[dict]) -> list[dict]:
    """The pairs as m = 2 ranked rows, the chosen response listed second (ranking [1, 0])."""
    return [{"prompt": r["prompt"], "responses": [r["rejected"], r["chosen"]], "ranking": [1, 0],
             "user": r["user"], "group": r["group"]} for r in rows]


def first_batch(model_dir: str, data_path: str, out: Path):
    """(trainer, loss, {name: grad}) of the first micro-batch through the trainer's own step functions."""
    cfg = load_config(CONFIG, base_overrides(model_dir, data_path, out, **{
        "experts.num_experts": 2, "train.max_steps": 3, "train.export": False, "em.gate_update": "joint",
        # the pair path the rankings reduce to bit for bit is the separate one (log-probs, then the loss); the fused
        # pair path equals it to rounding (tests/integration/test_fused_train.py)
        "loss.fused": "never"}))
    trainer = MixDPOTrainer(cfg)
    trainer.setup()
    batch = trainer.next_batch()
    trainer.batch_in_epoch = 0
    out_ = trainer.policy_forward(batch)
    res = trainer.batch_loss(as_pairs(out_.logps, batch["index"].shape[0]), trainer.ref_logps(batch, out_),
                             trainer.gate_forward(out_, batch))
    trainer.engine.backward(res.policy_loss)
    grads = {n: p.grad.clone() for n, p in trainer.engine.module.named_parameters() if p.grad is not None}
    for p in trainer.engine.module.parameters():
        p.grad = None
    return trainer, res, grads


def test_m2_ranked_rows_reproduce_the_pair_path_exactly(tiny_gpt2_dir, tmp_path):
    rows = synthetic_rows()
    paths = {"pairs": write_jsonl(tmp_path / "pairs.jsonl", rows),
             "ranked": write_jsonl(tmp_path / "ranked.jsonl", ranked_pairs(rows))}
    got = {}
    for name, path in paths.items():
        trainer, res, grads = first_batch(tiny_gpt2_dir, path, tmp_path / name)
        try:
            trainer.train()
        finally:
            trainer.cleanup()
        metrics = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")}
                   for r in read_rows(tmp_path / name / "metrics.jsonl")]
        got[name] = (res, grads, metrics)
    (a, ga, ma), (b, gb, mb) = got["pairs"], got["ranked"]
    assert torch.equal(a.loss, b.loss) and torch.equal(a.resp, b.resp) and torch.equal(a.margins, b.margins)
    assert ga.keys() == gb.keys() and len(ga) > 0
    assert all(torch.equal(ga[n], gb[n]) for n in ga), [n for n in ga if not torch.equal(ga[n], gb[n])]
    assert len(train_rows(ma)) == 3 and ma == mb  # three steps with the gate's closed-form update: the same numbers


def test_m3_rankings_train_and_evaluate_through_the_cli(tiny_gpt2_dir, tmp_path):
    """configs/rankings.yaml on the generated pairwise-conflicting rankings (m = 3), a few steps, then evaluate."""
    paths = write_ranked_task(RankedReviewsConfig(num_items=64, num_test=24, m=3), str(tmp_path / "data"))
    out = tmp_path / "run"
    over = {"model.name_or_path": tiny_gpt2_dir, "data.path": paths["train_ranked"], "data.max_length": 64,
            "data.max_prompt_length": 16, "train.output_dir": str(out), "train.max_steps": 6,
            "train.micro_batch_size": 8, "train.log_every": 1, "train.plots": False}
    assert cli.main(["train", "--config", str(RANKINGS), *[f"{k}={v}" for k, v in over.items()]]) == 0
    rows = train_rows(read_rows(out / "metrics.jsonl"))
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    # policy ≈ reference at step 1: each expert gives all 3! orders about the same probability, so the Plackett–Luce
    # loss is about log 6 = 1.792 (a pair's would be log 2 = 0.693)
    assert abs(rows[0]["loss"] - math.log(6)) < 0.1
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).lm_head.weight
    for k in range(3):
        head = AutoModelForCausalLM.from_pretrained(str(out / "export" / f"expert_{k}")).lm_head.weight
        assert not torch.equal(head, base)  # every expert head trained
    evals = tmp_path / "eval.jsonl"
    assert cli.main(["evaluate", "--run", str(out), "--data", paths["test_ranked"], "--out", str(evals)]) == 0
    summary = json.loads((tmp_path / "eval.summary.json").read_text())
    per_item = read_rows(evals)
    assert len(per_item) == 24 and all(len(r["margins"]) == 3 and len(r["resp"]) == 3 for r in per_item)
    assert set(summary["per_group"]) == set(GROUPS) and "recovery" in summary


@pytest.mark.parametrize("update,mode", [("joint", "gumbel"), ("alternate", "exact")])
def test_m4_rankings_train_a_moe_gate(tiny_gpt2_dir, tmp_path, update, mode):
    """The gate machinery on ranked items (m = 4): a MoE gate trained jointly under the Gumbel relaxation, or by
    alternation with the refreshed log-probs; the gate's weights move and every logged number is finite."""
    paths = write_ranked_task(RankedReviewsConfig(num_items=48, num_test=8, m=4), str(tmp_path / "data"))
    out = tmp_path / "run"
    cfg = load_config(RANKINGS, base_overrides(tiny_gpt2_dir, paths["train_ranked"], out, **{
        "data.max_length": 64, "data.max_prompt_length": 16, "gate.kind": "moe", "gate.lr": 0.05,
        "em.gate_update": update, "em.mode": mode, "train.max_steps": 3, "train.micro_batch_size": 8,
        "train.log_every": 1, "train.export": False}))
    trainer = MixDPOTrainer(cfg)
    trainer.setup()
    try:
        before = {n: p.detach().clone() for n, p in trainer.gate.named_parameters()}
        trainer.train()
        assert before and all(not torch.equal(p, before[n]) for n, p in trainer.gate.named_parameters())
    finally:
        trainer.cleanup()
    rows = train_rows(read_rows(out / "metrics.jsonl"))
    assert len(rows) == 3 and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert all("gate_loss" in r for r in rows)
