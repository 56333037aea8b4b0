"""The run directory's guards: one run at a time (a lock), and a finished run stays finished.

- `RunLock`: `output_dir/.lock`, held with `fcntl.flock` by rank 0 from set-up to clean-up. A second run into the
  same directory fails at once with the holder's pid, host and start time. The kernel drops the lock when the
  holder dies (even by SIGKILL), so a crashed run never leaves a stale lock behind.
- `FINISHED`: written when a run has trained all its steps and exported. Rerunning the same config into a finished
  run directory trains nothing, exports nothing and rewrites nothing; a changed config is refused by the resume
  contract (training/resume.py) before that.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"
FINISHED_FILE = "FINISHED"


class RunDirInUse(RuntimeError):
    pass


class RunLock:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_FILE
        self._f = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunDirInUse(f"{self.path.parent} is in use by another run ({holder}); two runs in one "
                              f"train.output_dir would interleave their metrics and delete each other's "
                              f"checkpoints. Wait for it, or use another train.output_dir.") from None
        f.seek(0)
        f.truncate()
        since = datetime.datetime.now().isoformat(" ", "seconds")
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}")
        f.flush()
        self._f = f

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


def mark_finished(out_dir: str | Path, step: int) -> None:
    path = Path(out_dir) / FINISHED_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"step": step, "time": datetime.datetime.now().isoformat(" ", "seconds")}) + "\n")
    os.replace(tmp, path)


def finished_step(out_dir: str | Path) -> int | None:
    """The step a finished run ended at, or None when the run directory holds no finished run."""
    path = Path(out_dir) / FINISHED_FILE
    return json.loads(path.read_text())["step"] if path.is_file() else None


def take_lock(out_dir: str | Path, rank: int) -> RunLock:
    """Rank 0 locks output_dir for the run's life; every rank fails if another run holds it."""
    from mixdpo_ds.training.distributed import all_ranks_true

    lock, err = RunLock(out_dir), None
    if rank == 0:
        try:
            lock.acquire()
        except RunDirInUse as e:
            err = e
    if not all_ranks_true(err is None, "cpu"):
        raise err or RunDirInUse(f"{out_dir} is in use by another run (rank 0 could not lock it)")
    return lock
