"""Expert parallelism under the DeepSpeed engine on gloo CPU ranks.

ep_size=2 on 2 ranks and on 4 ranks: two SGD(momentum) steps of the expert-parallel model equal the
dense single-process reference to 1e-6 at ZeRO 0/1/2; checkpoints write one file per expert and
round-trip exactly; resume equals the uninterrupted step; head bytes per rank halve.
"""
import json

import pytest
import torch
from ep_worker import H, K, V, run_ep_checks, spawn_workers

from mixdpo_ds.model.parallel import ExpertParallelHeads, check_expert_parallel

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world,stages", [(2, [0, 1, 2]), (4, [2])])
def test_ep2_matches_dense_reference(tmp_path, world, stages, capsys):
    spawn_workers(run_ep_checks, world, 2, stages, str(tmp_path))
    results = json.loads((tmp_path / "ep_results.json").read_text())
    with capsys.disabled():
        print(f"\n[ep world={world}] head bytes/rank: ep2 {results['head_bytes_per_rank']} "
              f"vs dense {results['dense_head_bytes']}; max |EP - dense| per stage: "
              f"{ {s: r['max_diff_step2'] for s, r in results['stages'].items()} }")
    assert results["head_bytes_per_rank"] * 2 == results["dense_head_bytes"] == K * V * H * 4
    assert set(results["stages"]) == {str(s) for s in stages}


def test_check_expert_parallel_errors():
    with pytest.raises(ValueError, match=r"experts.ep_size=2 must divide experts.num_experts=3"):
        check_expert_parallel(3, 2)
    with pytest.raises(ValueError, match=r"needs ZeRO stage 0, 1 or 2.*zero_stage=3"):
        check_expert_parallel(4, 2, zero_stage=3, world_size=2)
    with pytest.raises(ValueError, match=r"must divide the world size 3"):
        check_expert_parallel(4, 2, world_size=3)
    check_expert_parallel(3, 1, zero_stage=3)  # dense heads are fine under ZeRO-3
    with pytest.raises(ValueError, match="ep_size"):
        ExpertParallelHeads(3, 5, 2, ep_size=2)


def test_ep1_equals_dense_logprobs():
    """ep_size=1 (no communication): the table equals a hand-written per-row sum of log_softmax gathers.

    Two sequences: tokens 0,1 -> seq 0, token 2 -> seq 1 (target -100 contributes 0)."""
    from mixdpo_ds.training import distributed as mdist

    mdist.init_distributed()
    g = torch.Generator().manual_seed(0)
    heads = torch.randn(2, 5, 3, generator=g)
    hidden = torch.randn(3, 3, generator=g)
    targets = torch.tensor([1, 4, -100])
    module = ExpertParallelHeads.from_dense(heads, 1, logprob_impl="naive")
    out = module(hidden, targets, torch.tensor([0, 0, 1]), 2)
    logp = torch.einsum("nh,kvh->nkv", hidden, heads).log_softmax(-1)  # (3, 2, 5)
    expected = torch.stack([logp[0, :, 1] + logp[1, :, 4], torch.zeros(2)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(module.gather_dense_state(), heads)


def test_zero3_with_expert_parallel_is_a_clear_error():
    """The trainer keeps an HfDeepSpeedConfig alive for ZeRO-3; building EP heads under it must refuse."""
    from transformers.integrations import HfDeepSpeedConfig

    from mixdpo_ds.model.experts import ExpertsConfig
    from mixdpo_ds.model.parallel import build_expert_parallel_heads

    ds = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    cfg = ExpertsConfig(num_experts=4, ep_size=2)
    with pytest.raises(ValueError, match=r"experts.ep_size=2 needs ZeRO stage 0, 1 or 2"):
        build_expert_parallel_heads(torch.zeros(4, 5, 3), cfg)
    del ds
