"""MixturePolicy under DeepSpeed ZeRO-3 on 2 gloo CPU ranks (docs/ARCHITECTURE.md "Experts", docs/deepspeed.md §4–§6).

The base model is partitioned at load (`HfDeepSpeedConfig` + from_pretrained), so `build_policy` must gather
the base head to copy it (heads) and must not deepcopy partitioned params (models), and the `models` kind reads
each LM head from its own forward (registered external parameters). Checked: the engine's (2B, K) log-probs
equal a dense single-process policy before and after one SGD step on the same batch (both ranks see the same
batch, so the averaged gradient is the dense one), and `expert_model(k)` built inside GatheredParameters (as the
trainer's export does) equals the dense policy's, to 1e-5.
"""
import json
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.distributed

LR = 0.5


def _entry(rank: int, world: int, port: int, model_dir: str, kinds: list[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for kind in kinds:      # one launch for all kinds: starting ranks dominates the time
        _check_kind(rank, world, model_dir, kind, out_dir)


def _check_kind(rank: int, world: int, model_dir: str, kind: str, out_dir: str) -> None:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from mixdpo_ds.model.experts import ExpertsConfig, build_policy
    from mixdpo_ds.training.batch import collate

    cfg = ExpertsConfig(kind=kind, num_experts=2, init_noise=0.1, trunk="trainable", logprob_impl="naive")
    batch = collate([{"prompt_ids": [5, 9, 40], "chosen_ids": [7, 8, 100, 3], "rejected_ids": [11, 12], "index": 0,
                      "user": -1, "group": -1},
                     {"prompt_ids": [6, 33], "chosen_ids": [200], "rejected_ids": [4, 90, 91, 92, 93], "index": 1,
                      "user": -1, "group": -1}], pad_token_id=0)
    keys = ("input_ids", "attention_mask", "labels", "prompt_last_index")

    dense = build_policy(model_dir, cfg, seed=0)
    before = dense(*[batch[k] for k in keys]).logps
    opt = torch.optim.SGD(dense.parameters(), lr=LR)
    before.sum().backward()
    opt.step()
    with torch.no_grad():
        after = dense(*[batch[k] for k in keys]).logps

    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "train_batch_size": 2 * world, "gradient_clipping": 0.0, "zero_optimization": {"stage": 3},
                 "zero_allow_untested_optimizer": True}
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must stay alive while from_pretrained runs)
    policy = build_policy(model_dir, cfg, seed=0)
    optimizer = torch.optim.SGD(policy.param_groups(LR, 0.0), lr=LR)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=ds_config)
    out = engine(*[batch[k] for k in keys]).logps
    diff_before = float((out.detach() - before.detach()).abs().max())
    engine.backward(out.sum())
    engine.step()
    with torch.no_grad():
        out2 = engine(*[batch[k] for k in keys]).logps
    diff_after = float((out2 - after).abs().max())
    diff_export = 0.0
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):   # as the trainer's export does
        if rank == 0:
            for k in range(cfg.num_experts):
                exported = _logits(engine.module.expert_model(k), batch)
                diff_export = max(diff_export, float((exported - _logits(dense.expert_model(k), batch)).abs().max()))
    if rank == 0:
        with open(os.path.join(out_dir, f"zero3_{kind}.json"), "w") as f:
            json.dump({"diff_before": diff_before, "diff_after": diff_after, "diff_export": diff_export,
                       "step_change": float((after - before.detach()).abs().max())}, f)


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_zero3_policy_equals_dense(tiny_gpt2_dir, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kinds = ["heads", "models"]
    mp.spawn(_entry, args=(2, port, tiny_gpt2_dir, kinds, str(tmp_path)), nprocs=2, join=True)
    for kind in kinds:
        result = json.loads((tmp_path / f"zero3_{kind}.json").read_text())
        assert result["step_change"] > 1e-3, (kind, result)   # the step moved the log-probs: a real comparison
        assert result["diff_before"] < 1e-5, (kind, result)
        assert result["diff_after"] < 1e-5, (kind, result)
        assert result["diff_export"] < 1e-5, (kind, result)
