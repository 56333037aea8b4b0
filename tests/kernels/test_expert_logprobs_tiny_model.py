"""Kernel-level version of the trainer check: a tiny GPT-2 trunk with K = 3 expert heads gives the same sequence
log-probs, Mix-DPO loss and gradients (trunk, heads, gate) with impl = naive, chunked and triton (interpreter;
triton also for mbt_loss)."""
import pytest
import torch
from kernel_reference import kernel_device
from mixdpo_ds.kernels import IGNORE_INDEX, expert_logprobs, mbt_loss
from transformers import GPT2Config, GPT2Model

B, T, K, V = 2, 12, 3, 101


def _model_and_batch():
    """Fresh tiny GPT-2 trunk, K noisy copies of its tied head, a gate logit vector and a 2B-row batch whose
    first 4 tokens of each row are prompt (label -100) and whose last row ends in 2 padding tokens."""
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=T, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: impls see one function
    trunk = GPT2Model(config).to(kernel_device())
    base = trunk.wte.weight.detach()  # (V, H), the tied LM head
    heads = torch.nn.Parameter(base.expand(K, -1, -1) + 0.02 * torch.randn_like(base.expand(K, -1, -1)))  # (K, V, H)
    gate = torch.nn.Parameter(0.1 * torch.randn(K, device=base.device))
    input_ids = torch.randint(0, V, (2 * B, T), device=base.device)
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[-1, -2:] = IGNORE_INDEX
    ref_logps = -30 + torch.randn(B, 2, device=base.device)
    return trunk, heads, gate, input_ids, labels, ref_logps


def _step(impl, trunk, heads, gate, input_ids, labels, ref_logps):
    """Sequence log-probs (2B, K) → Mix-DPO loss → backward; returns (seq_logps, loss, {name: grad})."""
    for p in [*trunk.parameters(), heads, gate]:
        p.grad = None
    hidden = trunk(input_ids).last_hidden_state[:, :-1]  # (2B, T-1, H), predicts labels[:, 1:]
    targets = labels[:, 1:]  # (2B, T-1)
    keep = targets != IGNORE_INDEX
    rows = torch.arange(2 * B, device=targets.device)[:, None].expand_as(targets)[keep]  # (N,)
    token_logps = expert_logprobs(hidden[keep], heads, targets[keep], impl=impl)  # (N, K)
    seq_logps = token_logps.new_zeros(2 * B, K).index_add_(0, rows, token_logps)  # (2B, K)
    policy_logps = seq_logps.view(2, B, K).transpose(0, 1)  # (B, 2, K): chosen rows first
    out = mbt_loss(policy_logps, ref_logps, torch.log_softmax(gate, -1), beta=0.1,
                   impl="triton" if impl == "triton" else "naive")
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in trunk.named_parameters() if p.grad is not None}
    grads.update(heads=heads.grad.clone(), gate=gate.grad.clone())
    return seq_logps.detach(), out.loss.detach(), grads


@pytest.mark.kernels
def test_tiny_gpt2_same_step_for_every_impl():
    setup = _model_and_batch()
    seq_ref, loss_ref, grads_ref = _step("naive", *setup)
    assert len(grads_ref) > 10 and all(g.abs().sum() > 0 for g in grads_ref.values())
    for impl in ("chunked", "triton"):
        seq, loss, grads = _step(impl, *setup)
        torch.testing.assert_close(seq, seq_ref, rtol=1e-5, atol=1e-5, msg=f"{impl} seq_logps")
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7, msg=f"{impl} loss")
        assert grads.keys() == grads_ref.keys()
        for name, g in grads.items():
            scale = grads_ref[name].abs().max()
            torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-5 * scale, msg=f"{impl} d{name}")
