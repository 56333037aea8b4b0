"""MixturePolicy.forward(loss=FusedLoss(...)) (model/lowrank_heads.py `fused_heads_loss`): the policy loss of the
no-recompute kernels equals the separate path (forward → sequence log-probs → mixdpo_loss) for low-rank and dense
heads, frozen and trainable trunks: the loss, logps, the in-pass reference, resp and every parameter's gradient."""
import pytest
import torch
from _experts_testlib import make_batch, policy_logps

from mixdpo_ds.core.losses import mixdpo_loss
from mixdpo_ds.model.experts import ExpertsConfig, build_policy
from mixdpo_ds.model.lowrank_heads import FusedLoss


def _policy(path, rank, trunk):
    cfg = ExpertsConfig(kind="heads", num_experts=3, head_rank=rank, trunk=trunk, init_noise=0.2,
                        logprob_impl="chunked")
    return build_policy(path, cfg, torch_dtype=torch.float64)


def _grads(policy):
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rank", [4, None])
@pytest.mark.parametrize("trunk", ["frozen", "trainable"])
def test_fused_equals_separate_path(tiny_gpt2_dir, rank, trunk):
    batch = make_batch(3)
    B = 3
    log_w = torch.log_softmax(torch.tensor([[0.3, -0.2, 0.1], [1.0, 0.0, -1.0], [0.0, 0.5, 0.2]]), -1).double()
    g = torch.Generator().manual_seed(0)
    given_ref = None if trunk == "frozen" else -torch.rand(B, 2, generator=g, dtype=torch.float64) * 30
    kw = dict(posterior_correction=1, label_smoothing=0.05)
    separate = _policy(tiny_gpt2_dir, rank, trunk)
    out = policy_logps(separate, batch)
    ref = given_ref if given_ref is not None else out.ref_logps.view(2, B).T.double()
    res = mixdpo_loss(out.logps.double().view(2, B, 3).transpose(0, 1), ref, log_w, 0.3, **kw)
    res.policy_loss.backward()
    fused = _policy(tiny_gpt2_dir, rank, trunk)
    seen = []
    gate = lambda features: seen.append(features) or log_w  # noqa: E731 - the gate runs inside the forward
    got = fused(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prompt_last_index"],
                loss=FusedLoss(gate, given_ref, 0.3, kw))
    got.policy_loss.backward()
    # the separate path sums its log-probs in fp32 (sum_per_row), the fused one keeps fp64: fp32-level tolerances
    torch.testing.assert_close(got.policy_loss.double(), res.policy_loss.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logps, out.logps.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got.resp.double(), res.resp.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen[0], out.prompt_features)
    assert (got.ref_logps is None) == (given_ref is not None)
    if got.ref_logps is not None:
        torch.testing.assert_close(got.ref_logps, out.ref_logps)
    want, have = _grads(separate), _grads(fused)
    assert have.keys() == want.keys() and have  # frozen dense heads: the one (K, V, H) parameter
    for name in want:
        scale = want[name].abs().max().item()  # summed gradients (biases) cancel: fp32 rounding at their scale
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_refusals(tiny_gpt2_dir):
    batch = make_batch(2)
    args = batch["input_ids"], batch["attention_mask"], batch["labels"]
    trainable = _policy(tiny_gpt2_dir, 4, "trainable")
    with pytest.raises(ValueError, match="ref_logps=None needs the built-in reference"):
        trainable(*args, loss=FusedLoss(torch.zeros(2, 3), None, 0.1, {}))
    lora = build_policy(tiny_gpt2_dir, ExpertsConfig(kind="lora", num_experts=2))
    with pytest.raises(ValueError, match="experts.kind='heads' only"):
        lora(*args, loss=FusedLoss(torch.zeros(2, 2), torch.zeros(2, 2), 0.1, {}))
