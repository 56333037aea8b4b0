"""Worker for the expert-parallel tests: a tiny trunk + K heads, dense (1 rank) vs ExpertParallelHeads.

Run by `tests/distributed/test_expert_parallel.py` through `spawn_workers` (torch.multiprocessing,
gloo). Each worker asserts; rank 0 writes its measurements to `out_dir/ep_results.json`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from mixdpo_ds.training import distributed as mdist

V, H, K = 24, 8, 4
SEQS = 8  # global batch: 8 sequences
LR = 0.5


def spawn_workers(fn, world: int, *args) -> None:
    """Start `world` gloo ranks on this host running fn(rank, world, *args)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(world, port, fn, args), nprocs=world, join=True)


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    mdist.init_distributed()
    fn(rank, world, *args)
    # Tear the process group down before the interpreter exits: a rank that exits with gloo's (or DeepSpeed's
    # shm comm) threads still running aborts with "terminate called without an active exception" (seen here).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def clean_env() -> dict:
    """os.environ without the process-group variables: a test that initialised torch.distributed in the pytest
    process (RANK, WORLD_SIZE=1, MASTER_PORT of its store) must not leak them into launched ranks."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in drop}


def global_batch(seed: int = 0):
    """SEQS sequences of lengths 2..6 (so token counts differ per rank): ids, targets, seq_index."""
    g = torch.Generator().manual_seed(seed)
    lengths = [2 + (3 * i) % 5 for i in range(SEQS)]
    ids = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    targets = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    for t in targets:  # one ignored position per sequence, as a prompt/padding token would be
        t[0] = -100
    return ids, targets


def pack(ids, targets):
    """Lists of per-sequence tensors -> flat (N,) ids, targets, seq_index."""
    seq_index = torch.cat([torch.full((len(x),), i) for i, x in enumerate(ids)])
    return torch.cat(ids), torch.cat(targets), seq_index


class TinyModel(nn.Module):
    """trunk: embedding + linear + tanh -> hidden (N, H); heads: dense (K, V, H) or ExpertParallelHeads.
    loss = −mean_s logsumexp_k(log w_k + logps_sk): the mixture log-likelihood couples all experts."""

    def __init__(self, ep_size: int = 0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(V, H)
        self.proj = nn.Linear(H, H)
        with torch.no_grad():
            for p in (self.embed.weight, self.proj.weight, self.proj.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        heads = torch.randn(K, V, H, generator=g) * 0.5
        self.register_buffer("log_w", torch.log_softmax(torch.arange(K, dtype=torch.float32) / K, 0))
        if ep_size:
            from mixdpo_ds.model.parallel import ExpertParallelHeads

            self.heads = ExpertParallelHeads.from_dense(heads, ep_size, logprob_impl="naive")
        else:
            self.heads = nn.Parameter(heads)

    def forward(self, ids, targets, seq_index, num_seqs):
        hidden = torch.tanh(self.proj(self.embed(ids)))  # (N, H)
        if isinstance(self.heads, nn.Parameter):
            logits = torch.einsum("nh,kvh->nkv", hidden, self.heads).log_softmax(-1)  # (N, K, V)
            mask = targets == -100
            tok = logits.gather(-1, targets.clamp(min=0)[:, None, None].expand(-1, K, 1)).squeeze(-1)
            tok = tok.masked_fill(mask[:, None], 0.0)  # (N, K)
            logps = tok.new_zeros(num_seqs, K).index_add(0, seq_index, tok)
        else:
            logps = self.heads(hidden, targets, seq_index, num_seqs)  # (S, K)
        return -torch.logsumexp(self.log_w + logps, dim=-1).mean()

    def dense_heads(self) -> torch.Tensor:
        if isinstance(self.heads, nn.Parameter):
            return self.heads.detach().clone()
        return self.heads.gather_dense_state()


def dense_reference(steps: int = 2, momentum: float = 0.9):
    """1 process, the whole global batch, plain torch SGD: trunk/head weights after each step."""
    model = TinyModel(ep_size=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    ids, targets = global_batch()
    flat = pack(ids, targets)
    states, losses = [], []
    for _ in range(steps):
        loss = model(*flat, SEQS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        states.append({"embed": model.embed.weight.detach().clone(), "proj": model.proj.weight.detach().clone(),
                       "heads": model.dense_heads()})
    return states, losses


def _engine(model, stage: int, micro: int):
    import deepspeed

    from mixdpo_ds.model.parallel import moe_param_groups

    groups = moe_param_groups([{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}])
    opt = torch.optim.SGD(groups, lr=LR, momentum=0.9)
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _step(engine, flat, num_seqs):
    loss = engine(*flat, num_seqs)
    engine.backward(loss)
    engine.step()
    return mdist.all_reduce_mean(loss.detach()).item()


def _state(engine):
    m = engine.module
    return {"embed": m.embed.weight.detach().clone(), "proj": m.proj.weight.detach().clone(),
            "heads": m.dense_heads()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run_ep_checks(rank: int, world: int, ep_size: int, stages: list[int], out_dir: str) -> None:
    """For each ZeRO stage: 2 SGD steps of the EP model on this rank's shard == dense reference (1e-6);
    checkpoint after step 1 -> per-expert files; fresh engine + load == step-1 state exactly; its step 2 ==
    the uninterrupted step 2 exactly. Records head parameter bytes per rank."""
    ref_states, ref_losses = dense_reference()
    ids, targets = global_batch()
    my_ids, my_targets = mdist.shard(ids, rank, world), mdist.shard(targets, rank, world)
    flat, num_seqs = pack(my_ids, my_targets), len(my_ids)
    results = {"world": world, "ep_size": ep_size, "stages": {}}
    for stage in stages:
        engine = _engine(TinyModel(ep_size=ep_size), stage, num_seqs)
        loss1 = _step(engine, flat, num_seqs)
        state1 = _state(engine)
        ckpt = Path(out_dir) / f"ckpt_z{stage}"
        engine.save_checkpoint(str(ckpt), tag="s1")
        loss2 = _step(engine, flat, num_seqs)
        state2 = _state(engine)
        diffs = [_max_diff(state1, ref_states[0]), _max_diff(state2, ref_states[1])]
        assert abs(loss1 - ref_losses[0]) < 1e-6 and abs(loss2 - ref_losses[1]) < 1e-6, (loss1, loss2, ref_losses)
        assert max(diffs) < 1e-6, f"stage {stage}: EP vs dense max |diff| {diffs}"
        mdist.barrier()
        expert_files = sorted(p.name for p in (ckpt / "s1").glob("layer_0_expert_*_model_states.pt"))
        assert expert_files == [f"layer_0_expert_{k}_mp_rank_00_model_states.pt" for k in range(K)], expert_files

        resumed = _engine(TinyModel(ep_size=ep_size, seed=123), stage, num_seqs)
        resumed.load_checkpoint(str(ckpt), tag="s1")
        assert _max_diff(_state(resumed), state1) == 0.0, "checkpoint round trip is not exact"
        loss2_resumed = _step(resumed, flat, num_seqs)
        resume_diff = _max_diff(_state(resumed), state2)
        assert loss2_resumed == loss2 and resume_diff == 0.0, (loss2_resumed, loss2, resume_diff)
        results["stages"][stage] = {"max_diff_step1": diffs[0], "max_diff_step2": diffs[1], "loss1": loss1}

    from mixdpo_ds.model.parallel import head_param_bytes

    ep_bytes = head_param_bytes(TinyModel(ep_size=ep_size).heads)
    dense_bytes = K * V * H * 4
    assert ep_bytes * ep_size == dense_bytes, (ep_bytes, dense_bytes)
    results.update(head_bytes_per_rank=ep_bytes, dense_head_bytes=dense_bytes, expert_files=expert_files)
    if rank == 0:
        (Path(out_dir) / "ep_results.json").write_text(json.dumps(results, indent=1))
