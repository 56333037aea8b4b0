"""`mixdpo evaluate` / `mixdpo generate` on a run directory built without training (config.yaml + an export of an
untrained tiny mixture): missing exports, prompt length and empty prompts, unknown users, non-finite margins."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mixdpo_ds import cli
from mixdpo_ds.model.experts import build_policy
from mixdpo_ds.model.gating import build_gate
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.evaluate import NonFiniteError, evaluate_run
from mixdpo_ds.training.export import export_experts
from mixdpo_ds.training.generate import generate

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
USERS = ["alice", "bob", "carol"]
ROWS = [{"prompt": f"Question {i}?", "chosen": f" Good answer {i}.", "rejected": f" Bad {i}.",
         "user": USERS[i % 3], "group": "ab"[i % 2]} for i in range(6)]


def make_run(root: Path, model_dir: str, tokenizer, gate: dict | None = None, nan: bool = False,
             users: list[str] = USERS) -> Path:
    """A run directory as `mixdpo train` leaves it: config.yaml and export/ (2 heads experts and the gate);
    `users`: the training data's users (the gate's user ids)."""
    run = root / "run"
    over = {"model.name_or_path": model_dir, "data.path": "unused.jsonl", "data.group_column": "group",
            "data.max_length": 48, "data.max_prompt_length": 24, "experts.num_experts": 2,
            "train.output_dir": str(run), **{f"gate.{k}": v for k, v in (gate or {}).items()}}
    cfg = load_config(TINY, [f"{k}={v}" for k, v in over.items()])
    cfg.to_yaml(run / "config.yaml")
    policy = build_policy(model_dir, cfg.experts)
    if nan:
        with torch.no_grad():
            policy.heads[1].fill_(float("nan"))  # expert 1 gives NaN log-probs
    vocab = {u: i for i, u in enumerate(users)}
    g = build_gate(cfg.gate, 2, policy.config.hidden_size, num_users=len(vocab))
    export_experts(policy, g, str(run / "export"), tokenizer, user_vocab=vocab)
    return run


def write_rows(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, tiny_gpt2_dir, tiny_tokenizer) -> Path:
    return make_run(tmp_path_factory.mktemp("user_run"), tiny_gpt2_dir, tiny_tokenizer,
                    gate={"kind": "moe", "features": "prompt+user"})


# ------------------------------------------------------------------------------------------ missing runs
def test_a_run_without_an_export_names_the_missing_directory(tmp_path, tiny_gpt2_dir, tiny_tokenizer, capsys):
    run = tmp_path / "run"
    load_config(TINY, [f"model.name_or_path={tiny_gpt2_dir}"]).to_yaml(run / "config.yaml")
    message = (f"{run / 'export'}: the run has no export (it is written at the end of training with "
               "train.export=true, the default; a run that stopped early or had train.export=false has none)")
    with pytest.raises(FileNotFoundError) as e:
        generate(str(run), "Hello")
    assert str(e.value) == message
    with pytest.raises(FileNotFoundError) as e:
        evaluate_run(str(run), write_rows(tmp_path / "d.jsonl", ROWS), str(tmp_path / "eval.jsonl"))
    assert str(e.value) == message
    with pytest.raises(FileNotFoundError, match=r"run directory .*nowhere not found"):
        generate(str(tmp_path / "nowhere"), "Hello")


# ---------------------------------------------------------------------------------------------- generate
def test_generate_truncates_a_long_prompt_from_the_left(user_run, caplog):
    long_prompt = " ".join(f"word{i}" for i in range(300)) + " end"  # far beyond the tiny model's 128 positions
    with caplog.at_level(logging.WARNING, logger="mixdpo_ds.training.generate"):
        out = generate(str(user_run), long_prompt, route="top1", max_new_tokens=8, user="bob", greedy=True)
    assert isinstance(out["completion"], str) and len(out["w"]) == 2
    assert "kept its last 120 (dropped" in caplog.text and "--max-new-tokens=8 fit the model's 128 positions" \
        in caplog.text
    with pytest.raises(ValueError, match=r"--max-new-tokens=128 leaves no room for the prompt in the model's 128 "
                                         "positions"):
        generate(str(user_run), long_prompt, max_new_tokens=128)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_generate_rejects_an_empty_prompt(user_run, prompt):
    with pytest.raises(ValueError, match=r"^--prompt is empty: give the text to continue"):
        generate(str(user_run), prompt)


def test_generate_rejects_an_unknown_user_and_lists_known_ones(user_run):
    with pytest.raises(ValueError) as e:
        generate(str(user_run), "Hello", user="nobody")
    assert str(e.value) == ("--user 'nobody' is not a user of the run's training data (its 3 users include 'alice', "
                            "'bob', 'carol'); omit --user to route by the population prior (the mean of the "
                            "training users' weights), or `mixdpo personalize` the user from a few of their labelled "
                            "pairs")
    assert generate(str(user_run), "Hello", user="carol", max_new_tokens=2)["route"] == "sample"


def test_generate_warns_that_a_mix_gate_ignores_the_user(tmp_path, tiny_gpt2_dir, tiny_tokenizer, caplog):
    run = make_run(tmp_path, tiny_gpt2_dir, tiny_tokenizer)
    with caplog.at_level(logging.WARNING, logger="mixdpo_ds.training.generate"):
        generate(str(run), "Hello", user="nobody", max_new_tokens=2)
    assert "--user 'nobody' is ignored: the run's gate (gate.kind=mix, gate.features=prompt) does not route by " \
        "user" in caplog.text


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_counts_and_warns_about_unknown_users(user_run, tmp_path, caplog):
    rows = [dict(r) for r in ROWS]
    rows[0]["user"], rows[3]["user"] = "dave", "erin"
    with caplog.at_level(logging.WARNING, logger="mixdpo_ds.training.evaluate"):
        summary = evaluate_run(str(user_run), write_rows(tmp_path / "d.jsonl", rows), str(tmp_path / "e.jsonl"))
    assert summary["unknown_users"] == 2 and summary["n"] == 6
    assert summary["gate_evidence"]["users_checked"] == 0  # a user-routing gate is checked; 2 pairs per user < 5
    assert ("evaluate: 2 of 6 pairs have a user the training data did not have (2 users, e.g. 'dave', 'erin'); "
            "the gate routes them by the population prior, the mean of the 3 training users' gate weights") \
        in caplog.text


def test_unseen_users_take_the_mean_of_the_training_users_weights(tmp_path, tiny_gpt2_dir, tiny_tokenizer):
    """A user-id gate with random rows: alice, bob, carol get their rows; dave, and generate without --user, get
    (1/3) Σ_u w(u) of the three training users (not the shared no-user row, which no training pair reaches)."""
    from mixdpo_ds.training.evaluate import score_pairs
    from mixdpo_ds.training.export import load_export_gate

    run = make_run(tmp_path, tiny_gpt2_dir, tiny_tokenizer, gate={"kind": "moe", "features": "user", "init": "random"})
    gate, _ = load_export_gate(str(run / "export"))
    with torch.no_grad():
        rows_w = gate(None, torch.tensor([0, 1, 2, -1])).exp()     # the training users' rows and the no-user row
    mean = rows_w[:3].mean(0)
    assert not torch.allclose(mean, rows_w[3], atol=1e-3)          # the two priors differ for this gate
    data = [dict(r) for r in ROWS]
    data[0]["user"] = "dave"
    scored = score_pairs(str(run), write_rows(tmp_path / "d.jsonl", data))["rows"]
    by_user = {r["user"]: torch.tensor(r["w"]) for r in scored}
    torch.testing.assert_close(by_user["dave"], mean)
    for i, u in enumerate(USERS):
        torch.testing.assert_close(by_user[u], rows_w[i])
    assert generate(str(run), "Hello", max_new_tokens=1)["w"] == pytest.approx(mean.tolist(), abs=1e-6)


def test_a_user_gate_trained_without_users_routes_unknown_users_by_the_no_user_row(tmp_path, tiny_gpt2_dir,
                                                                                   tiny_tokenizer, caplog):
    """No training users: there is no population to average, so every user is new and takes the no-user row (the
    one row such training reached), and the warning says so instead of naming a prior of 0 users."""
    from mixdpo_ds.training.evaluate import score_pairs
    from mixdpo_ds.training.export import load_export_gate

    run = make_run(tmp_path, tiny_gpt2_dir, tiny_tokenizer, gate={"kind": "moe", "features": "user", "init": "random"},
                   users=[])
    gate, _ = load_export_gate(str(run / "export"))
    assert not gate.has_population_prior
    with torch.no_grad():
        no_user = gate(None, torch.tensor([-1])).exp()[0]
    with caplog.at_level(logging.WARNING, logger="mixdpo_ds.training.evaluate"):
        scored = score_pairs(str(run), write_rows(tmp_path / "d.jsonl", ROWS))["rows"]
    assert "the gate routes them by the shared no-user row (the training data had no users)" in caplog.text
    for r in scored:
        torch.testing.assert_close(torch.tensor(r["w"]), no_user)
    assert generate(str(run), "Hello", max_new_tokens=1)["w"] == pytest.approx(no_user.tolist(), abs=1e-6)


def test_evaluate_checks_max_length_against_the_model(user_run, tmp_path):
    with pytest.raises(ValueError, match=r"^data.max_length=256 exceeds the model's 128 positions \(n_positions\)"):
        evaluate_run(str(user_run), write_rows(tmp_path / "d.jsonl", ROWS), str(tmp_path / "e.jsonl"),
                     overrides=["data.max_length=256"])


def test_evaluate_fails_on_non_finite_margins(tmp_path, tiny_gpt2_dir, tiny_tokenizer, capsys):
    run = make_run(tmp_path, tiny_gpt2_dir, tiny_tokenizer, nan=True)
    data, out = write_rows(tmp_path / "d.jsonl", ROWS), tmp_path / "eval" / "e.jsonl"
    with pytest.raises(NonFiniteError, match=r"^evaluate: 6 of 6 pairs have non-finite \(NaN/inf\) expert margin"):
        evaluate_run(str(run), data, str(out))
    summary = json.loads((tmp_path / "eval" / "e.summary.json").read_text())
    assert summary["non_finite"] == {"margins": 6, "w": 0}
    capsys.readouterr()
    assert cli.main(["evaluate", "--run", str(run), "--data", data, "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bars of model loading
    assert err.startswith("error: evaluate: 6 of 6 pairs have non-finite (NaN/inf) expert margins: the model, "
                          "reference or gate produced NaN/inf")


def test_fit_prompt_keeps_the_tokenizer_prefix_and_the_last_tokens(caplog):
    from mixdpo_ds.training.generate import fit_prompt

    assert fit_prompt([1, 2, 3], 8, 4, keep_prefix=1) == [1, 2, 3]  # fits: unchanged
    with caplog.at_level(logging.WARNING, logger="mixdpo_ds.training.generate"):
        assert fit_prompt([1, 2, 3, 4, 5, 6], 5, 2, keep_prefix=1) == [1, 5, 6]  # BOS + the last 2
    assert "the prompt has 6 tokens: kept its last 2 (dropped 3 from the left)" in caplog.text
    with pytest.raises(ValueError, match="--max-new-tokens=4 leaves no room"):
        fit_prompt([1, 2, 3, 4, 5, 6], 5, 4, keep_prefix=1)
