"""Two-process fault probes for tests/distributed/test_faults_distributed.py (env: RANK, WORLD_SIZE, MASTER_*).

    python faults_worker.py frozen   # rank 1 stops answering; rank 0's collective must time out (exit 3)
    python faults_worker.py clean    # both ranks all-reduce and exit normally (their shm buffers must go)
"""
import os
import sys
import time

import torch


def main(mode: str) -> int:
    from mixdpo_ds.training.distributed import init_distributed

    torch.set_num_threads(1)
    init_distributed(timeout_s=3.0)
    rank = int(os.environ["RANK"])
    import deepspeed.comm as dist

    t = torch.ones(4)
    dist.all_reduce(t)  # both ranks: the DeepSpeed CPU all-reduce (creates the shm buffers)
    if mode == "frozen":
        if rank == 1:
            time.sleep(60)  # frozen: never joins the next collective
            return 0
        t0 = time.time()
        try:
            torch.distributed.all_reduce(t)
        except Exception as e:  # gloo's timeout
            print(f"rank 0: collective failed after {time.time() - t0:.1f} s: {type(e).__name__}: {e}", flush=True)
            os._exit(3)
        return 1
    from mixdpo_ds.training.distributed import shm_buffer_path

    print(f"shm buffer {shm_buffer_path()} {'exists' if os.path.exists(shm_buffer_path()) else 'missing'}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
