"""One process does not JIT-build DeepSpeed's shared-memory all-reduce op (training/distributed.py): in a fresh
torch-extensions cache `init_distributed` at WORLD_SIZE 1 compiles nothing, the backend has no shm op, and no
/dev/shm buffer is created."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os
    from deepspeed.comm import comm
    from mixdpo_ds.training.distributed import init_distributed, shm_buffer_path
    init_distributed()
    print(comm.cdb.shm_comm_op is None, os.path.exists(shm_buffer_path()))
""")


def test_one_process_builds_no_shm_op(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")  # a new machine: nothing cached
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["True", "False"], proc.stdout
    assert "deepspeed_shm_comm" not in proc.stdout + proc.stderr
    assert not (tmp_path / "torch_extensions").exists() or not any((tmp_path / "torch_extensions").rglob("*shm*"))


def test_a_stale_build_lock_is_removed_only_when_old_and_built(tmp_path, monkeypatch, caplog):
    """A killed JIT build leaves deepspeed_shm_comm/lock, on which every later multi-rank run would sleep forever:
    removed (with a warning) when older than STALE_LOCK_S and the library exists; a young lock (a live build) or one
    without the library (the build never finished) stays."""
    import logging
    import os
    import time

    from mixdpo_ds.training.distributed import SHM_OP, STALE_LOCK_S, remove_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = tmp_path / SHM_OP
    build.mkdir()
    lock = build / "lock"
    lock.touch()
    assert not remove_stale_build_lock() and lock.exists()             # no library yet
    (build / f"{SHM_OP}.so").touch()
    assert not remove_stale_build_lock() and lock.exists()             # young: a build may hold it
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="mixdpo_ds"):
        assert remove_stale_build_lock()
    assert not lock.exists() and "stale build lock" in caplog.text
    assert not remove_stale_build_lock()                               # nothing left to remove
