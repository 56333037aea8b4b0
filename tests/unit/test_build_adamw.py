"""SkippableAdamW (training/build.py): the fused implementation by default, the same updates as torch's per-tensor
loop, and a skipped step leaves parameters and moments untouched."""
import torch

from mixdpo_ds.training.build import SkippableAdamW, fused_adamw_supported


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _steps(optimizer, params, n=3):
    for i in range(n):
        loss = sum(((p - i) ** 2).sum() for p in params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_fused_by_default_and_equal_to_the_loop():
    fused_params, loop_params = _params(), _params()
    groups = [{"params": fused_params[:1], "weight_decay": 0.1}, {"params": fused_params[1:], "weight_decay": 0.0}]
    fused = SkippableAdamW(groups, lr=1e-2)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW([{"params": loop_params[:1], "weight_decay": 0.1},
                              {"params": loop_params[1:], "weight_decay": 0.0}], lr=1e-2, foreach=False)
    _steps(fused, fused_params)
    _steps(loop, loop_params)
    for a, b in zip(fused_params, loop_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert SkippableAdamW(_params(), lr=1e-2, foreach=False).defaults["fused"] is None  # the caller's choice wins
    assert not fused_adamw_supported([torch.zeros(2, dtype=torch.long)])


def test_skip_next_leaves_everything_as_it_was():
    params = _params()
    optimizer = SkippableAdamW(params, lr=1e-2)
    _steps(optimizer, params, 1)
    before = [p.detach().clone() for p in params]
    moments = [optimizer.state[p]["exp_avg"].clone() for p in params]
    optimizer.skip_next = True
    _steps(optimizer, params, 1)
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
    assert all(torch.equal(optimizer.state[p]["exp_avg"], m) for p, m in zip(params, moments, strict=True))
    _steps(optimizer, params, 1)
    assert not torch.equal(params[0], before[0]) and optimizer.skip_next is False
