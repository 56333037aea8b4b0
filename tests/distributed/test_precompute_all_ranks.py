"""`precompute_reference_logps_sharded` on 2 gloo processes (model/reference.py): each rank scores its share, and
every rank ends with the table one process computes alone; both ran the same number of forwards (ZeRO-3 needs
it), also with an odd count and with fewer examples than ranks; a second call reads rank 0's cache file and runs
no forward on any rank. A stand-in reference (log-probs = ±the example's value) keeps it fast."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mixdpo_ds.model.reference import precompute_reference_logps, precompute_reference_logps_sharded

pytestmark = pytest.mark.distributed


class Stand:
    """(2B,) 'log-probs': the chosen rows' value x, the rejected rows' -x; counts its calls."""

    def __init__(self):
        self.calls = 0

    def logps(self, batch):
        self.calls += 1
        return torch.cat([batch["x"], -batch["x"]])


def _collate(rows):
    return {"index": torch.tensor([r["index"] for r in rows]), "x": torch.tensor([r["x"] for r in rows])}


def _examples(n):  # indices out of order and with a gap (no index n // 2), as a filtered split may have
    order = [(3 * i) % n for i in range(n)]  # a permutation for n prime to 3
    return [{"index": j + (j >= n // 2), "x": float(i) + 0.25} for i, j in enumerate(order)]


def _worker(rank, init, out, cache_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = {}
    for n in (7, 8, 1):
        ref = Stand()
        table = precompute_reference_logps_sharded(ref, _examples(n), _collate, 2, None, None, rank, 2, "cpu")
        cached = precompute_reference_logps_sharded(Stand(), _examples(n), _collate, 2, cache_dir, f"k{n}", rank, 2,
                                                    "cpu")
        again = Stand()
        reread = precompute_reference_logps_sharded(again, _examples(n), _collate, 2, cache_dir, f"k{n}", rank, 2,
                                                    "cpu")
        results[n] = (table, ref.calls, cached, reread, again.calls)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sharded_precompute_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path}/init", str(tmp_path), str(tmp_path / "cache")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for n in (7, 8, 1):
        want = precompute_reference_logps(Stand(), _examples(n), _collate, 2, None, None)    # (n + 1, 2), one gap
        assert torch.isnan(want).any()
        calls = {r[n][1] for r in ranks}
        assert len(calls) == 1 and calls.pop() == math.ceil(math.ceil(n / 2) / 2), n   # ceil(share / batch 2) each
        for table, _, cached, reread, again_calls in (r[n] for r in ranks):
            for got in (table, cached, reread):
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
            assert again_calls == 0
