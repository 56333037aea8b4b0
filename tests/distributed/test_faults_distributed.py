"""Distributed faults: a frozen rank makes the others fail within the collective timeout instead of hanging, and
every process removes its own DeepSpeed shm all-reduce buffer when it exits (docs/deepspeed.md §13)."""
import glob
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ep_worker import clean_env

pytestmark = pytest.mark.distributed
WORKER = str(Path(__file__).with_name("faults_worker.py"))
ROOT = Path(__file__).resolve().parents[2]


def _start(mode: str) -> tuple[list[subprocess.Popen], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        # LOCAL_SIZE: as the launcher sets it; with it DeepSpeed's shm all-reduce is used (and its buffers made)
        env = {**clean_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, WORKER, mode], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs, port


def test_a_frozen_rank_times_out_instead_of_hanging():
    procs, _ = _start("frozen")
    t0 = time.time()
    try:
        out, _ = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode == 3, out[-3000:]
    assert "rank 0: collective failed after" in out
    assert time.time() - t0 < 100


def test_each_process_removes_its_shm_buffer_at_exit():
    procs, port = _start("clean")
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    made = [line for out in outs for line in out.splitlines() if line.startswith("shm buffer ")]
    assert len(made) == 2 and all(line.endswith(" exists") for line in made), outs  # the probe is real
    left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*")
    assert left == [], left
