"""A few steps on the real HH-RLHF sample (tests/data, relabeled helpful / harmless), then `mixdpo evaluate`
with `objective` as the group column and `mixdpo generate` on the exported run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixdpo_ds import cli

from .conftest import read_rows, train

pytestmark = pytest.mark.integration
HH = Path(__file__).resolve().parents[1] / "data" / "hh_rlhf_relabeled_sample.jsonl"


def test_hh_train_evaluate_generate(tiny_gpt2_dir, tmp_path, capsys):
    run = tmp_path / "hh"
    rows = train(tiny_gpt2_dir, str(HH), run, **{
        "data.group_column": "objective", "data.on_bad_row": "skip", "data.eval_fraction": 0.2,
        "data.max_length": 64, "data.max_prompt_length": 40, "experts.num_experts": 2, "train.max_steps": 3,
        "train.eval_every": 2})
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 3]
    assert all("eval/resp/mean_1" in r and "eval/rewards/accuracies" in r for r in rows if "eval/loss" in r)

    out = tmp_path / "eval" / "hh.jsonl"
    assert cli.main(["evaluate", "--run", str(run), "--data", str(HH), "--out", str(out), "--group-column",
                     "objective", "data.on_bad_row=skip", "data.max_length=64", "data.max_prompt_length=40"]) == 0
    pairs = read_rows(out)
    assert len(pairs) >= 100
    for p in pairs:
        assert len(p["resp"]) == len(p["w"]) == len(p["margins"]) == 2
        assert abs(sum(p["resp"]) - 1) < 1e-5 and abs(sum(p["w"]) - 1) < 1e-5
        assert 0 < p["p_mixture"] < 1 and p["group"] in ("helpful", "harmless")
    summary = json.loads((tmp_path / "eval" / "hh.summary.json").read_text())
    assert summary["n"] == len(pairs)
    assert summary["accuracy"] == sum(p["p_mixture"] > 0.5 for p in pairs) / len(pairs)
    assert set(summary["per_group"]) == {"helpful", "harmless"} and len(summary["expert_accuracy"]) == 2
    # Recovery by hand from the per-pair rows: the better of the two expert↔group matchings (identity, swap).
    groups = ("helpful", "harmless")
    ids = [(p["expert"], groups.index(p["group"])) for p in pairs]
    identity = sum(e == g for e, g in ids)
    assert summary["recovery_accuracy"] == pytest.approx(max(identity, len(ids) - identity) / len(ids))
    assert summary["recovery"]["method"] == "permutations"

    capsys.readouterr()
    prompt = "Human: What is a good book to read?\n\nAssistant:"
    for extra in (["--expert", "1", "--greedy"], ["--route", "top1"], ["--route", "sample", "--seed", "3"]):
        assert cli.main(["generate", "--run", str(run), "--prompt", prompt, "--max-new-tokens", "5", *extra]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["expert"] in (0, 1) and len(result["w"]) == 2 and isinstance(result["completion"], str)
        if extra[0] == "--expert":
            assert result["expert"] == 1 and result["route"] == "fixed"
        if extra[1] == "top1":
            assert result["expert"] == max(range(2), key=lambda k: result["w"][k])
