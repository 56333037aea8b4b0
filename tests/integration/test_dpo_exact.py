"""K = 1: the recipe's step-1 loss and gradients equal plain DPO written out by hand on the same batch with
the same Hugging Face model (fp32, 1e-6).

Hand DPO (Rafailov et al. 2023): lp± = Σ_response log softmax(logits)[y_t]; the reference is a frozen copy
of the same initial model; loss = mean_i −logsigmoid(β ((lp+ − lp−) − (rp+ − rp−))).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from mixdpo_ds.training.batch import as_pairs
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.trainer import MixDPOTrainer

from .conftest import base_overrides, read_rows, train_rows
from .test_train import hf_sequence_logps

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
BETA = 0.3


def hand_dpo(model_dir: str, policy_state: dict, batch: dict, rpo_alpha: float = 0.0):
    """The policy starts from the recipe's initial weights (base + experts.init_noise, so policy != ref and the
    loss is not just log 2); the reference is the base model. rpo_alpha > 0 adds TRL's RPO term,
    α · mean_i (−lp+_i / |y+_i|). Returns (loss, gradients, that NLL or None)."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # eval: no dropout, as the recipe
    policy.load_state_dict(policy_state)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    B = batch["index"].shape[0]
    lp = hf_sequence_logps(policy, batch)  # (2B,) rows 0..B-1 chosen
    with torch.no_grad():
        rp = hf_sequence_logps(ref, batch)
    logits = (lp[:B] - lp[B:]) - (rp[:B] - rp[B:])
    loss = -F.logsigmoid(BETA * logits).mean()
    nll = None
    if rpo_alpha:
        nll = (-lp[:B] / (batch["labels"][:B] != -100).sum(1).float()).mean()
        loss = loss + rpo_alpha * nll
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in policy.named_parameters()}, nll


def first_step(tiny_gpt2_dir, prefs_jsonl, out, **overrides):
    """A K = 1 `models` run at its first batch, through the trainer's own step functions: (trainer, its model, the
    initial weights, the batch, the policy objective after backward, its metrics). The caller cleans up."""
    cfg = load_config(CONFIG, base_overrides(tiny_gpt2_dir, prefs_jsonl, out, **{
        "experts.kind": "models", "experts.num_experts": 1, "experts.init_noise": 0.5, "loss.beta": BETA,
        "train.max_steps": 1, "train.micro_batch_size": 4, "train.reference": "model", "train.export": False,
        **overrides}))
    trainer = MixDPOTrainer(cfg)
    trainer.setup()
    model = trainer.engine.module.models[0]
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = trainer.next_batch()
    trainer.batch_in_epoch = 0  # a later train() starts from the same first batch
    out = trainer.policy_forward(batch)
    policy_logps = as_pairs(out.logps, batch["index"].shape[0])
    res = trainer.batch_loss(policy_logps, trainer.ref_logps(batch, out), trainer.gate_forward(out, batch))
    loss, extra = trainer.policy_objective(res, batch, policy_logps)
    trainer.engine.backward(loss)
    return trainer, model, initial, batch, loss, {**res.metrics, **extra}


@pytest.mark.parametrize("correction", [0, 1])
def test_k1_equals_hand_dpo(tiny_gpt2_dir, prefs_jsonl, tmp_path, correction):
    out = tmp_path / "k1"
    trainer, model, initial, batch, loss, _ = first_step(tiny_gpt2_dir, prefs_jsonl, out,
                                                         **{"em.posterior_correction": correction})
    try:
        want_loss, want_grads, _ = hand_dpo(tiny_gpt2_dir, initial, batch)
        assert abs(want_loss.item() - 0.6931) > 1e-3  # a real comparison, not two copies of log 2
        torch.testing.assert_close(loss.detach(), want_loss, atol=1e-6, rtol=0)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want_grads[name], atol=1e-6, rtol=0, msg=name)
            p.grad = None

        trainer.train()  # one real step through the engine: its logged loss is the same number
        step1 = train_rows(read_rows(out / "metrics.jsonl"))[0]
        assert step1["step"] == 1
        assert abs(step1["loss"] - want_loss.item()) < 1e-6
    finally:
        trainer.cleanup()


def test_k1_rpo_alpha_adds_the_chosen_nll(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    """loss.rpo_alpha = 0.5, K = 1: loss = hand DPO + 0.5 · mean_i (−lp+_i / |y+_i|) (TRL's RPO), gradients included."""
    alpha = 0.5
    trainer, model, initial, batch, loss, metrics = first_step(tiny_gpt2_dir, prefs_jsonl, tmp_path / "rpo",
                                                               **{"loss.rpo_alpha": alpha})
    try:
        want_loss, want_grads, nll = hand_dpo(tiny_gpt2_dir, initial, batch, rpo_alpha=alpha)
        torch.testing.assert_close(loss.detach(), want_loss, atol=1e-6, rtol=0)
        assert abs(metrics["rpo_nll"].item() - nll.item()) < 1e-5
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want_grads[name], atol=1e-6, rtol=0, msg=name)
    finally:
        trainer.cleanup()
