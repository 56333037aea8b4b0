"""`mixdpo train` end to end: Mix-DPO (K=3 heads) and MoE-DPO (K=2 models, user-conditioned gate).

Each run must finish, lower its loss, change every trainable parameter, write every metric name of the
issue, and export experts whose `from_pretrained` reload gives the log-probs the trained policy gives.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mixdpo_ds import cli
from mixdpo_ds.model.experts import build_policy
from mixdpo_ds.training.batch import MODEL_KEYS, collate
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.data import load_preference_data
from mixdpo_ds.training.export import load_expert

from .conftest import read_rows, train, train_rows

pytestmark = pytest.mark.integration

METRIC_NAMES = ["loss", "policy_loss", "gate_loss", "mbt/loglik", "elbo", "rewards/chosen", "rewards/rejected",
                "rewards/margins", "rewards/accuracies", "rewards/accuracies_posterior", "logps/chosen",
                "logps/rejected", "resp/entropy", "gate/entropy", "tokens_per_s", "learning_rate", "grad_norm", "beta",
                "estep/alpha"]


def expected_names(K: int) -> list[str]:
    per_k = [f"{pre}{k}{post}" for k in range(K) for pre, post in
             (("experts/", "/margin"), ("experts/", "/accuracy"), ("resp/mean_", ""), ("gate/w_", ""))]
    return METRIC_NAMES + per_k


def hf_sequence_logps(model, batch: dict) -> torch.Tensor:
    """Σ over response tokens of log softmax(logits)[next token], written out with the HF model's logits. (2B,)"""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def trained_policy(run: Path):
    """The policy as the trainer ran it: build_policy + the module weights of the final engine checkpoint."""
    cfg = load_config(run / "config.yaml")
    policy = build_policy(cfg.model.name_or_path, cfg.experts, seed=cfg.train.seed)
    step = (run / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run / "checkpoints" / step / "engine" / "mp_rank_00_model_states.pt", weights_only=False)
    policy.load_state_dict(state["module"], strict=False)
    return cfg, policy.eval()


def check_export_logps(run: Path, K: int) -> None:
    """Each exported expert, reloaded with AutoModelForCausalLM.from_pretrained, gives the trained log-probs."""
    cfg, policy = trained_policy(run)
    tok_dir = run / "export" / "expert_0"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    batch = collate(load_preference_data(cfg.data, tok).train[:4], tok.pad_token_id)
    with torch.no_grad():
        trained = policy(**{k: batch[k] for k in MODEL_KEYS}).logps  # (2B, K)
        for k in range(K):
            model = AutoModelForCausalLM.from_pretrained(run / "export" / f"expert_{k}").eval()
            torch.testing.assert_close(hf_sequence_logps(model, batch), trained[:, k], atol=1e-4, rtol=1e-5)


def test_mixdpo_heads_k3(tiny_gpt2_dir, prefs_by_prompt_jsonl, tmp_path):
    run = tmp_path / "mix"
    rows = train(tiny_gpt2_dir, prefs_by_prompt_jsonl, run, **{
        "experts.kind": "heads", "experts.num_experts": 3, "experts.init_noise": 0.05, "gate.kind": "mix",
        "train.max_steps": 10, "train.lr": 1e-2, "train.micro_batch_size": 8, "loss.beta": 0.5,
        "train.plots": True, "train.save_every": 5, "train.tensorboard": True})
    steps = train_rows(rows)
    assert [r["step"] for r in steps] == list(range(1, 11))
    for name in expected_names(3):
        assert all(name in r and math.isfinite(r[name]) for r in steps), name
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.1, (first, last)

    # Every trainable parameter (each expert's head) changed; the frozen trunk did not.
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    for k in range(3):
        exported = load_file(run / "export" / f"expert_{k}" / "model.safetensors")
        assert not torch.equal(exported["lm_head.weight"], base.lm_head.weight), k
        assert torch.equal(exported["transformer.h.0.attn.c_attn.weight"], base.transformer.h[0].attn.c_attn.weight)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    for f in ("config.yaml", "loss.png", "responsibilities.png", "export/gate/gate.json", "checkpoints/latest"):
        assert (run / f).exists(), f
    check_export_logps(run, 3)


def test_moedpo_models_user_gate(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    run = tmp_path / "moe"
    rows = train(tiny_gpt2_dir, prefs_jsonl, run, **{
        "experts.kind": "models", "experts.num_experts": 2, "experts.init_noise": 0.05, "gate.kind": "moe",
        "gate.features": "user", "gate.lr": 0.05, "em.warmup_random_steps": 2, "train.max_steps": 12,
        "train.lr": 3e-3, "train.micro_batch_size": 8, "loss.beta": 0.5,
        # The loss includes the gate's CE(q, w), which falls only as fast as the trust region lets the gate move
        # (docs/math.md §12). In 12 steps the default ρ = 0.1 takes the mean loss from 1.131 to 0.898 (0.79×;
        # measured); ρ = 0.3 (3× the step) to 0.404, which the halving check below needs.
        "gate.trust_region": 0.3})
    steps = train_rows(rows)
    for name in expected_names(2):
        assert all(name in r and math.isfinite(r[name]) for r in steps), name
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < 0.5 * first, (first, last)

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    base_params = dict(base.named_parameters())
    for k in range(2):
        exported = AutoModelForCausalLM.from_pretrained(run / "export" / f"expert_{k}")
        for name, p in exported.named_parameters():
            assert not torch.equal(p, base_params[name]), (k, name)
    gate = load_file(run / "export" / "gate" / "gate.safetensors")
    assert gate["net.weight"].abs().sum() > 0  # initialised to zero (uniform gate), trained by eq. 12
    check_export_logps(run, 2)

    # The user-conditioned gate recovers the two annotator groups from argmax responsibilities.
    out = tmp_path / "eval.jsonl"
    assert cli.main(["evaluate", "--run", str(run), "--data", prefs_jsonl, "--out", str(out)]) == 0
    summary = __import__("json").loads(out.with_suffix(".summary.json").read_text())
    assert summary["recovery_accuracy"] >= 0.9, summary["recovery"]
    assert len(read_rows(out)) == 48


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_zero0(tiny_gpt2_dir, prefs_by_prompt_jsonl, tmp_path, stage):
    """Single process, ZeRO 1/2/3 (engine JSONs from ds_configs/) train exactly like ZeRO-0: same losses,
    same exported weights (a checkpoint mid-run included)."""
    run = {"experts.num_experts": 2, "train.max_steps": 3, "train.save_every": 2, "train.lr": 1e-2}
    zero0 = train_rows(train(tiny_gpt2_dir, prefs_by_prompt_jsonl, tmp_path / "z0", **run))
    zero = train_rows(train(tiny_gpt2_dir, prefs_by_prompt_jsonl, tmp_path / "z", **run,
                            **{"deepspeed.config": f"zero{stage}"}))
    assert [r["loss"] for r in zero] == pytest.approx([r["loss"] for r in zero0], abs=1e-6)
    for k in range(2):
        a = load_file(tmp_path / "z0" / "export" / f"expert_{k}" / "model.safetensors")
        b = load_file(tmp_path / "z" / "export" / f"expert_{k}" / "model.safetensors")
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", [
    {"experts.kind": "heads", "gate.kind": "moe", "gate.features": "prompt+user", "em.gate_update": "alternate",
     "em.refresh": True, "gate.pretrain_steps": 20, "gate.pretrain_label_column": "group"},
    {"experts.kind": "lora", "gate.kind": "mix", "em.refresh": True, "model.dtype": "bf16"},
    {"experts.kind": "heads", "experts.trunk": "trainable", "gate.kind": "mix", "em.mode": "gumbel",
     "em.phases": "paper", "em.tau_anneal_steps": 2, "train.grad_accum": 2},
], ids=["heads-moe-alternate-refresh", "lora-bf16-refresh", "trainable-trunk-gumbel-phases-accum"])
def test_other_modes_run(tiny_gpt2_dir, prefs_jsonl, tmp_path, variant):
    """The remaining gate updates, expert kinds, dtypes and E-step modes run and train every expert."""
    rows = train_rows(train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "run", **{
        "experts.num_experts": 2, "experts.init_noise": 0.1, "train.max_steps": 3, "train.lr": 1e-2, **variant}))
    assert len(rows) == 3 and all(math.isfinite(r[name]) for r in rows for name in expected_names(2))
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    for k in range(2):  # load_expert: a lora expert is exported as an adapter, merged into the base here
        exported = load_expert(str(tmp_path / "run" / "export"), k).state_dict()
        changed = [n for n, p in base.state_dict().items() if n in exported and not torch.equal(
            exported[n].float(), p.float())]
        assert changed, k
    if variant["gate.kind"] == "moe":
        assert load_file(tmp_path / "run" / "export" / "gate" / "gate.safetensors")["net.weight"].abs().sum() > 0


def test_training_accuracy_matches_evaluate_and_does_not_use_the_label(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    """K = 3 heads on the conflicting two-group data (the same pair judged both ways): the logged
    `rewards/accuracies` is the mixture prediction, so on the training pairs it equals `mixdpo evaluate`'s mixture
    accuracy of the same model; the posterior accuracy, which sees the label, is far higher on this data."""
    import json

    run = tmp_path / "acc"
    rows = train(tiny_gpt2_dir, prefs_jsonl, run, **{
        "experts.num_experts": 3, "experts.init_noise": 0.3, "train.max_steps": 12, "train.lr": 3e-2,
        "train.micro_batch_size": 8, "loss.beta": 0.5, "data.eval_path": prefs_jsonl, "train.eval_batch_size": 48})
    final_eval = [r for r in rows if "eval/loss" in r][-1]  # the whole training set, after the last step
    out = tmp_path / "eval.jsonl"
    assert cli.main(["evaluate", "--run", str(run), "--data", prefs_jsonl, "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert abs(final_eval["eval/rewards/accuracies"] - summary["accuracy"]) <= 1 / 48 + 1e-9, (final_eval, summary)
    # Each pair appears judged both ways, so a label-free prediction is right on at most one of the two: ≤ 0.5.
    # The posterior given the label can be right on both, as the old headline accuracy was.
    assert final_eval["eval/rewards/accuracies"] <= 0.5 + 1e-9
    assert final_eval["eval/rewards/accuracies_posterior"] > final_eval["eval/rewards/accuracies"] + 0.2
    last = train_rows(rows)[-1]
    assert last["rewards/accuracies"] <= 0.5 + 1e-9 < last["rewards/accuracies_posterior"]


def test_phase_schedule_changes_beta_and_the_estep_at_its_boundaries(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    """em.phases=paper over 10 steps (β = 0.4): progress (step − 1)/10 in [0, .3) → α = 2, β; [.3, .7) → α = 0.5;
    [.7, 1) → α = 1 (λ_conf .5, λ_w 1.5), β/2. The logged β and α are those the step's loss used."""
    rows = train_rows(train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "ph", **{
        "em.phases": "paper", "train.max_steps": 10, "loss.beta": 0.4, "train.export": False}))
    assert [r["estep/alpha"] for r in rows] == pytest.approx([2.0] * 3 + [0.5] * 4 + [1.0] * 3)
    assert [r["beta"] for r in rows] == pytest.approx([0.4] * 7 + [0.2] * 3)
    # the E-step temperature acts on q: softened early (α = 2), sharpened in the middle (α = 0.5)
    assert rows[2]["resp/entropy"] > rows[3]["resp/entropy"]


def test_callbacks_see_every_step_and_the_alternate_gate_trains_past_its_pretraining(tiny_gpt2_dir, prefs_jsonl,
                                                                                     tmp_path):
    """A callback snapshots the MoE gate after its pre-training (on_train_begin) and sees every step's record
    (responsibilities, gate weights, metrics), every log and save; `alternate` then moves the gate off that point."""
    from mixdpo_ds.training.callbacks import TrainerCallback
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.trainer import MixDPOTrainer

    from .conftest import base_overrides

    class Spy(TrainerCallback):
        def __init__(self):
            self.events, self.gate_after_pretraining = [], None

        def on_train_begin(self, trainer):
            self.gate_after_pretraining = {k: v.clone() for k, v in trainer.gate.state_dict().items()}

        def on_step_end(self, trainer, step, record):
            resp, log_w = record.cat("resp"), record.cat("log_w")
            assert resp.shape == log_w.shape == (8, 2) and torch.allclose(resp.sum(-1), torch.ones(8))
            self.events.append(("step", step, float(record.metrics["loss"])))

        def on_log(self, trainer, step, metrics):
            self.events.append(("log", step, metrics["loss"]))

        def on_save(self, trainer, step, path):
            self.events.append(("save", step, path.name))

    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    cfg = load_config(config, base_overrides(tiny_gpt2_dir, prefs_jsonl, tmp_path / "cb", **{
        "experts.num_experts": 2, "gate.kind": "moe", "gate.features": "prompt+user", "em.gate_update": "alternate",
        "gate.pretrain_steps": 20, "gate.pretrain_label_column": "group", "gate.lr": 0.05, "train.max_steps": 3,
        "train.micro_batch_size": 4, "train.grad_accum": 2, "train.save_every": 2, "train.export": False}))
    spy = Spy()
    trainer = MixDPOTrainer(cfg, callbacks=[spy])
    trainer.setup()
    try:
        trainer.train()
        after = trainer.gate.state_dict()
    finally:
        trainer.cleanup()
    assert [e[:2] for e in spy.events if e[0] == "step"] == [("step", 1), ("step", 2), ("step", 3)]
    assert [e[1] for e in spy.events if e[0] == "log"] == [1, 2, 3]
    assert [e[2] for e in spy.events if e[0] == "save"] == ["step_2", "step_3"]
    steps = {e[1]: e[2] for e in spy.events if e[0] == "step"}
    assert all(abs(steps[e[1]] - e[2]) < 1e-6 for e in spy.events if e[0] == "log")  # log_every=1: the same loss
    moved = [k for k in after if not torch.equal(after[k], spy.gate_after_pretraining[k])]
    assert "net.weight" in moved, moved


def test_a_forced_collapse_is_detected_and_reported(tiny_gpt2_dir, prefs_jsonl, tmp_path, caplog):
    """Two identical heads (no init noise, no random warm-up): they get identical updates forever, so their margins
    are equal on every pair; the collapse detectors flag the merged pair in the logged metrics and at the end."""
    rows = train_rows(train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "merged", **{
        "experts.num_experts": 2, "experts.init_noise": 0.0, "train.max_steps": 6, "train.lr": 1e-2,
        "train.micro_batch_size": 8, "loss.beta": 0.5, "train.export": False}))
    assert rows[-1]["collapse/merged_pairs"] == 1 and rows[-1]["collapse/max_margin_corr"] > 0.999
    assert "mixture collapse in the last" in caplog.text and "merged experts [(0, 1)]" in caplog.text
    distinct = train_rows(train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "distinct", **{
        "experts.num_experts": 2, "experts.init_noise": 1.0, "em.warmup_random_steps": 3, "train.max_steps": 6,
        "train.lr": 1e-2, "train.micro_batch_size": 8, "loss.beta": 0.5, "train.export": False}))
    assert distinct[-1]["collapse/max_margin_corr"] < rows[-1]["collapse/max_margin_corr"]


def test_gate_hold_steps_keep_the_moe_gate_until_the_experts_have_moved(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    """gate.hold_steps=2 after a 1-step random warm-up: the gate is untouched by steps 1-3, trained from step 4."""
    from mixdpo_ds.training.callbacks import TrainerCallback
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.trainer import MixDPOTrainer

    from .conftest import base_overrides

    class Snap(TrainerCallback):
        states = []

        def on_step_end(self, trainer, step, record):
            self.states.append(trainer.gate.state_dict()["net.weight"].clone())

    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    cfg = load_config(config, base_overrides(tiny_gpt2_dir, prefs_jsonl, tmp_path / "hold", **{
        "experts.num_experts": 2, "gate.kind": "moe", "gate.features": "user", "gate.lr": 0.05,
        "gate.hold_steps": 2, "em.warmup_random_steps": 1, "train.max_steps": 5, "train.export": False}))
    trainer = MixDPOTrainer(cfg, callbacks=[Snap()])
    trainer.setup()
    try:
        start = trainer.gate.state_dict()["net.weight"].clone()
        trainer.train()
    finally:
        trainer.cleanup()
    assert [torch.equal(s, start) for s in Snap.states] == [True, True, True, False, False]


def test_a_forced_collapse_is_repaired_by_the_split(tiny_gpt2_dir, prefs_jsonl, tmp_path, caplog):
    """The same forced collapse with em.split_every=4: at step 4 the detectors see the merged pair (0, 1), expert 1
    is re-seeded from expert 0 with noise, and the two experts then differ; a healthy run is never split."""
    common = {"experts.num_experts": 2, "train.max_steps": 10, "train.lr": 1e-2, "train.micro_batch_size": 8,
              "loss.beta": 0.5, "train.export": False, "train.log_every": 1, "em.split_every": 4,
              "em.split_noise": 0.5}
    rows = train_rows(train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "repaired", **common, **{"experts.init_noise": 0.0}))
    splits = [r["repair/splits"] for r in rows]
    assert splits == [0.0] * 3 + [1.0] * 7, splits  # one split, at step 4; none after (the pair is no longer merged)
    assert "step 4: mixture collapse: expert 1 re-seeded by splitting expert 0" in caplog.text
    before, after = rows[2]["collapse/max_margin_corr"], rows[-1]["collapse/max_margin_corr"]
    assert before > 0.999 and after < 0.99, (before, after)
    assert rows[-1]["collapse/merged_pairs"] == 0 and "mixture collapse in the last" not in caplog.text
    healthy = train_rows(train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "healthy", **common, **{
        "experts.init_noise": 1.0, "em.warmup_random_steps": 3}))
    assert healthy[-1]["repair/splits"] == 0.0


def test_split_is_refused_where_it_is_not_implemented(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    with pytest.raises(ValueError, match="em.split_every > 0 needs experts.kind=heads"):
        train(tiny_gpt2_dir, prefs_jsonl, tmp_path / "models", **{
            "experts.kind": "models", "experts.num_experts": 2, "em.split_every": 4, "train.max_steps": 2})
