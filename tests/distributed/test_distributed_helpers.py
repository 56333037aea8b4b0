"""mixdpo_ds.training.distributed: sharding (no processes) and the global-batch reductions on 2 gloo ranks."""
import pytest
import torch
from ep_worker import spawn_workers

from mixdpo_ds.training import distributed as mdist
from mixdpo_ds.training.metrics import MetricAccumulator

pytestmark = pytest.mark.distributed


def test_shard_contiguous_equal_slices():
    """6 examples, world 2: rank 0 -> [0, 1, 2], rank 1 -> [3, 4, 5]; world 3: [0, 1], [2, 3], [4, 5]."""
    batch = list(range(6))
    assert mdist.shard(batch, 0, 2) == [0, 1, 2] and mdist.shard(batch, 1, 2) == [3, 4, 5]
    assert [mdist.shard(batch, r, 3) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="multiple of 4"):
        mdist.shard(batch, 0, 4)
    with pytest.raises(ValueError, match="rank=2, world=2"):
        mdist.shard(batch, 2, 2)


def _check_reductions(rank: int, world: int) -> None:
    """Rank 0 holds resp rows [[1, 0], [0, 1]], rank 1 holds [[1, 0]] (unequal shards on purpose).

    global_mean_rows = ([1, 0] + [0, 1] + [1, 0]) / 3 = [2/3, 1/3]; the mean of the rank means would be
    ([0.5, 0.5] + [1, 0]) / 2 = [0.75, 0.25], which is wrong for unequal shards.
    all_reduce_mean of rank + 1 = (1 + 2) / 2 = 1.5.
    """
    resp = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) if rank == 0 else torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(mdist.global_mean_rows(resp), torch.tensor([2 / 3, 1 / 3]))
    assert mdist.all_reduce_mean(torch.tensor(float(rank + 1))).item() == 1.5
    acc = MetricAccumulator()  # the logged metrics: interval mean, then the mean over ranks
    acc.add({"a": torch.tensor(float(rank)), "b": torch.tensor(2.0 * rank)})
    assert acc.reduce() == {"a": 0.5, "b": 1.0}

    # differentiable global mean: loss_r = Σ_k c_k · w̄_k with w̄ the global row mean of x (3 rows over 2 ranks).
    # Summed over ranks (what the data-parallel average of gradients times P reproduces): d/dx_i = 2 c / 3 for
    # every row i of either rank; autograd on each rank must give exactly that.
    x = (torch.arange(4.0).view(2, 2) + rank).requires_grad_(True) if rank == 0 else \
        torch.tensor([[5.0, 7.0]], requires_grad=True)
    c = torch.tensor([1.0, -2.0])
    w_bar = mdist.differentiable_global_mean_rows(x)
    torch.testing.assert_close(w_bar.detach(), torch.tensor([(0 + 2 + 5) / 3, (1 + 3 + 7) / 3]))
    (c * w_bar).sum().backward()
    torch.testing.assert_close(x.grad, (2 * c / 3).expand_as(x))


def test_global_reductions_two_ranks():
    spawn_workers(_check_reductions, 2)


def test_init_distributed_maps_slurm_variables():
    """Under `srun` without the launcher (the alternative in launch/slurm.sbatch's header) RANK / WORLD_SIZE /
    LOCAL_RANK come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; one task here, so rank 0 of 1, LOCAL_RANK 0."""
    import socket
    import subprocess
    import sys

    from ep_worker import clean_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**clean_env(), "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    code = ("import os; from mixdpo_ds.training import distributed as d; d.init_distributed(); "
            "print('RESULT', d.rank(), d.world_size(), os.environ['LOCAL_RANK'], os.environ['WORLD_SIZE'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "RESULT 0 1 0 1" in out.stdout, out.stdout + out.stderr[-3000:]
