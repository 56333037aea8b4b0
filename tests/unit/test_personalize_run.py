"""Few-shot personalisation on runs (mixdpo_ds/training/personalize.py): the few-shot curve on hand-built rows,
`mixdpo calibrate`, `mixdpo personalize` + the user-weight store, `generate --user`, `evaluate --few-shot`."""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_run_tools import ROWS, make_run, write_rows

from mixdpo_ds import cli
from mixdpo_ds.core.personalize import user_posterior
from mixdpo_ds.training.evaluate import score_pairs
from mixdpo_ds.training.generate import generate
from mixdpo_ds.training.personalize import (
    calibration_report,
    few_shot_curve,
    load_user_store,
    matched_experts,
    personalize,
    posterior_weights,
    user_weights,
)


def _rows(users_per_group: int = 2, pairs: int = 4) -> list[dict]:
    """Group 0's users: expert 0 right (Δ = +2), expert 1 wrong (Δ = −3); group 1 the other way round. w = (½, ½):
    p_mixture = ½ σ(2) + ½ σ(−3) = 0.464 < ½, so the global mixture gets every pair wrong, the oracle every one
    right. One context pair: q_right = σ(2) / (σ(2) + σ(−3)) = 0.949, p = 0.949 σ(2) + 0.051 σ(−3) = 0.838 → right."""
    rows, index = [], 0
    for g in range(2):
        for u in range(users_per_group):
            for _ in range(pairs):
                m = [2.0, -3.0] if g == 0 else [-3.0, 2.0]
                p = 0.5 * (1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(3)))
                rows.append({"index": index, "user": f"g{g}_{u}", "group_id": g, "group": str(g), "w": [0.5, 0.5],
                             "margins": m, "p_mixture": p, "expert": g, "resp": [1.0 - g, float(g)]})
                index += 1
    return rows


def test_few_shot_curve_by_hand():
    rows = _rows()
    rows.append({**rows[0], "index": 99, "user": "loner"})  # 1 pair ≤ max(N) = 2: skipped
    dpo = [{"index": r["index"], "margins": [1.0 if r["index"] % 2 else -1.0]} for r in rows]
    c = few_shot_curve(rows, [2, 0, 1], repeats=3, temperature=[1.0], dpo_rows=dpo)
    assert c["shots"] == [0, 1, 2] and c["users"] == 4 and c["skipped_users"] == 1
    assert c["query_pairs"] == 4 * 2  # each user: 4 pairs − max(N) = 2 context positions
    assert c["accuracy"]["raw"] == [0.0, 1.0, 1.0] and c["accuracy"]["calibrated"] == [0.0, 1.0, 1.0]
    assert c["global_mixture"] == 0.0 and c["oracle_routed"] == 1.0 and c["dpo"] == pytest.approx(0.5, abs=0.2)
    assert c["routing"]["raw"][1:] == [1.0, 1.0]  # N = 0: q = w, a tie, argmax picks expert 0 (half the users)
    assert c["routing"]["raw"][0] == 0.5


def test_one_groups_users_alone_keep_the_matching_of_all_groups():
    """Group 1's users alone: matched on them only, group ids 0..1 against experts 0..1 leave group 1's expert to
    the matching of an empty group 0; with the mapping of all rows (group 1 → expert 1) the oracle is right."""
    rows = _rows()
    assert matched_experts(rows) == {0: 0, 1: 1}
    one = [r for r in rows if r["group_id"] == 1]
    c = few_shot_curve(one, [1], repeats=2, temperature=[1.0], oracle_experts=matched_experts(rows))
    assert c["oracle_routed"] == 1.0 and c["routing"]["raw"] == [1.0]
    assert few_shot_curve(one, [1], repeats=2, temperature=[1.0], oracle_experts={0: 1, 1: 0})["oracle_routed"] == 0.0


def test_few_shot_needs_users_with_enough_pairs():
    with pytest.raises(ValueError, match="needs a user column"):
        few_shot_curve([{**r, "user": None} for r in _rows()], [1])
    with pytest.raises(ValueError, match=r"no user has more than max\(N\) = 9 pairs"):
        few_shot_curve(_rows(), [9])


def test_crossfit_calibration_uses_other_users():
    """Without a temperature the curve fits T on the other fold of users: it runs and stays a probability."""
    c = few_shot_curve(_rows(users_per_group=3, pairs=6), [0, 1, 3], repeats=2)
    assert c["temperature"].startswith("cross-fitted") and all(0 <= a <= 1 for a in c["accuracy"]["calibrated"])


def test_posterior_weights_uses_the_mean_gate_weight_as_prior():
    """Rows with w (0.8, 0.2) and (0.4, 0.6): prior = (0.6, 0.4); margins (1, −1), (2, 0) →
    q ∝ (0.6 σ(1) σ(2), 0.4 σ(−1) σ(0)), the hand example of test_personalize without its third pair."""
    rows = [{"w": [0.8, 0.2], "margins": [1.0, -1.0]}, {"w": [0.4, 0.6], "margins": [2.0, 0.0]}]
    a = [0.6 * 0.7310586 * 0.8807971, 0.4 * 0.2689414 * 0.5]
    assert posterior_weights(rows) == pytest.approx([a[0] / sum(a), a[1] / sum(a)], abs=1e-6)


def test_calibration_report_lowers_nll():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(4000, generator=g) * 2
    wins = torch.rand(4000, generator=g) < torch.sigmoid(true)
    m = (torch.where(wins, 1.0, -1.0) * true * 4).unsqueeze(-1)  # 4x overconfident, K = 1
    rows = [{"w": [1.0], "margins": [float(x)]} for x in m[:, 0]]
    rep = calibration_report(rows)
    assert rep["temperature"][0] == pytest.approx(4.0, rel=0.15)
    assert rep["nll_after"] < rep["nll_before"] and rep["ece_after"] < rep["ece_before"]
    assert rep["accuracy_after"] == rep["accuracy_before"]  # K = 1: T never flips a decision


# ------------------------------------------------------------------------------------------- on a run directory
@pytest.fixture(scope="module")
def mix_run(tmp_path_factory, tiny_gpt2_dir, tiny_tokenizer):
    return make_run(tmp_path_factory.mktemp("mix_run"), tiny_gpt2_dir, tiny_tokenizer)


def test_user_weights_is_the_posterior_of_the_evaluated_pairs(mix_run, tmp_path):
    """user_weights(pairs) = softmax(log w + Σ_i logsigmoid(Δ_i)) of evaluate's own rows, for a file and for a list."""
    data = write_rows(tmp_path / "d.jsonl", ROWS)
    rows = score_pairs(str(mix_run), data)["rows"]
    want = user_posterior(torch.tensor(rows[0]["w"], dtype=torch.float64).log(),
                          torch.tensor([r["margins"] for r in rows], dtype=torch.float64)).tolist()
    assert user_weights(str(mix_run), data) == pytest.approx(want, abs=1e-9)
    assert user_weights(str(mix_run), ROWS) == pytest.approx(want, abs=1e-9)
    assert abs(sum(want) - 1) < 1e-9


def test_personalize_store_and_generate_route_with_it(mix_run, tmp_path, capsys):
    data = write_rows(tmp_path / "d.jsonl", ROWS)
    assert cli.main(["personalize", "--run", str(mix_run), "--pairs", data]) == 0
    store = load_user_store(str(mix_run))
    assert set(store["users"]) == {"alice", "bob", "carol"} and store["users"]["alice"]["n_pairs"] == 2
    assert "3 user(s) ->" in capsys.readouterr().out
    # a file without a user column needs --user, which names the new user
    bare = write_rows(tmp_path / "bare.jsonl", [{k: v for k, v in r.items() if k != "user"} for r in ROWS])
    with pytest.raises(ValueError, match="has no user column: pass --user"):
        personalize(str(mix_run), bare)
    res = personalize(str(mix_run), bare, user="zoe")
    assert res["users"]["zoe"]["n_pairs"] == 6 and "zoe" in load_user_store(str(mix_run))["users"]
    with pytest.raises(ValueError, match="--user 'nobody': no pair of"):
        personalize(str(mix_run), data, user="nobody")
    # generate routes a stored user with the stored weights (a mix gate would otherwise ignore --user)
    stored = load_user_store(str(mix_run))["users"]["zoe"]["w"]
    out = generate(str(mix_run), "Hello", user="zoe", route="top1", max_new_tokens=2, greedy=True)
    assert out["w"] == pytest.approx(stored, abs=1e-6) and out["expert"] == int(torch.tensor(stored).argmax())


def test_calibrate_and_evaluate_few_shot_cli(mix_run, tmp_path, capsys):
    rows = [{**r, "user": ["ann", "ben"][i % 2]} for i, r in enumerate(ROWS * 2)]
    data, out = write_rows(tmp_path / "d.jsonl", rows), tmp_path / "e.jsonl"
    assert cli.main(["calibrate", "--run", str(mix_run), "--data", data]) == 0
    cal = json.loads((mix_run / "calibration.json").read_text())
    assert len(cal["temperature"]) == 1 and cal["n"] == 12 and "ECE" in capsys.readouterr().out
    assert cli.main(["evaluate", "--run", str(mix_run), "--data", data, "--out", str(out), "--few-shot", "0,1,3",
                     "--few-shot-repeats", "2", "--dpo-run", str(mix_run)]) == 0
    summary = json.loads((tmp_path / "e.summary.json").read_text())
    fs = summary["few_shot"]
    assert fs["shots"] == [0, 1, 3] and fs["users"] == 2 and fs["temperature"] == cal["temperature"]
    assert fs["accuracy"]["raw"][0] == pytest.approx(fs["global_mixture"])  # N = 0: the prior is the mixture
    assert summary["calibrated"]["temperature"] == cal["temperature"]
    first = json.loads(out.read_text().splitlines()[0])
    assert "p_mixture_calibrated" in first and first["user"] in ("ann", "ben")
    (mix_run / "calibration.json").unlink()
