"""Atomic checkpoints: DeepSpeed engine state + trainer state, a `latest` pointer, rotation.

Layout of `output_dir/checkpoints/`:

    step_{N}/engine/...           engine.save_checkpoint(step_{N}, tag="engine") (model, optimizer, lr schedule)
    step_{N}/trainer_state.pt     step, data position, gate + gate optimizer, schedule position, RNG states
    step_{N}/rng_rank{r}.pt       rank r's Python / NumPy / torch RNG states
    step_{N}/save.json            {"id": this save's unique id, "previous": id of the checkpoint `latest` named
                                  when the save began (null: none)}
    latest                        text file: "step_{N}"

A save goes to `.tmp_step_{N}` first; only when every rank has written its files does rank 0 rename it
to `step_{N}` (os.replace is atomic on one filesystem) and then rewrite `latest` through a temporary
file + os.replace. A crash before the rename leaves the previous checkpoint and its `latest` pointer intact
(a stale `.tmp_*` directory is ignored and removed by the next save). A crash between the rename and the
pointer update leaves `latest` one save behind: `find_latest` then takes the complete checkpoint whose
save.json continues the one `latest` names. Matching ids, not step numbers, keeps a higher-numbered
checkpoint left over from an abandoned run (resumed from an earlier step into the same directory) out.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("mixdpo_ds")
ENGINE_TAG = "engine"
STATE_FILE = "trainer_state.pt"
RANK_RNG_FILE = "rng_rank{}.pt"  # every rank's own RNG states (dropout, sampling differ per rank)
SAVE_FILE = "save.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and, when present, CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pointed(root: Path) -> Path | None:
    """The checkpoint directory `latest` names (it may be missing or incomplete), or None without a pointer."""
    pointer = root / LATEST
    return root / pointer.read_text().strip() if pointer.is_file() else None


def _save_info(path: Path | None) -> dict:
    """A checkpoint's save.json ({} when absent: no checkpoint, or one written before save.json existed)."""
    f = None if path is None else path / SAVE_FILE
    return json.loads(f.read_text()) if f is not None and f.is_file() else {}


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / ENGINE_TAG).is_dir()


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), sorted by step."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    out = {}
    for p in sorted(root.iterdir(), key=lambda p: p.name.startswith(".old_")):  # step_N before .old_step_N
        m = _STEP_RE.match(p.name.removeprefix(".old_"))
        if m and p.is_dir() and is_complete(p):
            out.setdefault(int(m.group(1)), p)  # .old_step_N: a re-save moved it aside and crashed before the end
    return sorted(out.items())


def save_checkpoint(engine, output_dir: str | Path, step: int, trainer_state: dict[str, Any],
                    keep_last: int = 0) -> Path:
    """Save engine + trainer state as `checkpoints/step_{step}` atomically; every rank must call it.
    Returns the final path. `keep_last` > 0 deletes all but the newest `keep_last` checkpoints."""
    root = checkpoints_dir(output_dir)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    try:
        engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
        torch.save(rng_state(), tmp / RANK_RNG_FILE.format(_rank()))
        if _rank() == 0:
            torch.save(trainer_state, tmp / STATE_FILE)
            previous = _save_info(_pointed(root)).get("id")
            (tmp / SAVE_FILE).write_text(json.dumps({"id": uuid.uuid4().hex, "previous": previous}))
    except (OSError, RuntimeError) as e:  # a full disk shows as torch's bare "basic_ios::clear: iostream error"
        free = shutil.disk_usage(root).free if root.exists() else 0
        raise OSError(f"writing checkpoint {tmp} failed ({type(e).__name__}: {e}); {free / 2**20:.0f} MiB free on "
                      f"that filesystem. The previous checkpoint is intact; free space (or lower train.keep_last) "
                      f"and resume with train.resume_from=auto") from e
    _barrier()
    if _rank() == 0:
        aside = root / f".old_{final.name}"
        if final.exists():  # re-saving the same step: move the old copy aside, never delete the only good one first
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, final.name)
        shutil.rmtree(aside, ignore_errors=True)
        if keep_last > 0:
            for _, old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest checkpoint of the run, or None when there is no complete one.

    That is the checkpoint `latest` names, unless a later save renamed its directory into place and died before
    updating `latest`: then the newest complete checkpoint whose save.json continues the one `latest` names.
    Without a usable pointer (missing, or naming an incomplete directory): the newest complete checkpoint.
    """
    root = checkpoints_dir(output_dir)
    found = [p for _, p in list_checkpoints(output_dir)]
    current = _pointed(root)
    if current is not None and is_complete(current):
        current_id = _save_info(current).get("id")
        after = [p for p in found if current_id is not None and p != current
                 and _save_info(p).get("previous") == current_id]
        return after[-1] if after else current
    return found[-1] if found else None


def resolve_resume(resume_from: str | None, output_dir: str | Path) -> Path | None:
    """`train.resume_from` -> a checkpoint directory or None (fresh start).

    "auto": the latest checkpoint in output_dir, or None when there is none. A path may point at a
    `step_N` directory or at a run / checkpoints directory (its latest checkpoint is used).
    """
    if resume_from is None:
        if (found := find_latest(output_dir) if checkpoints_dir(output_dir).exists() else None) is not None:
            log.warning("%s already holds checkpoints (newest: %s) and train.resume_from is null: this run starts "
                        "from step 0 and will overwrite them. Set train.resume_from=auto to continue from the newest "
                        "one.", output_dir, found.name)
        return None
    if resume_from == "auto":
        return find_latest(output_dir)
    p = Path(resume_from)
    if is_complete(p):
        return p
    found = find_latest(p.parent if p.name == "checkpoints" else p)
    if found is not None:
        return found
    raise FileNotFoundError(f"train.resume_from={resume_from!r}: no complete checkpoint there "
                            f"(a step_N directory with {STATE_FILE} and {ENGINE_TAG}/, or a run directory)")


def load_checkpoint(engine, path: str | Path) -> dict[str, Any]:
    """Load engine state (model, optimizer, lr schedule) from `path` and return the trainer state."""
    path = Path(path)
    load_path, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine checkpoint in {path / ENGINE_TAG}")
    return read_trainer_state(path)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of the checkpoint at `path`, without touching the engine (e.g. to check the config)."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)


def load_rank_rng(path: str | Path) -> None:
    """Restore this rank's RNG states saved with the checkpoint at `path` (absent in older checkpoints: no-op)."""
    f = Path(path) / RANK_RNG_FILE.format(_rank())
    if f.is_file():
        set_rng_state(torch.load(f, map_location="cpu", weights_only=False))


def resume_candidates(output_dir: str | Path, first: str | Path) -> list[Path]:
    """`first`, then the older complete checkpoints of output_dir, newest first: the fallbacks of a damaged one."""
    first = Path(first)
    step = _STEP_RE.match(first.name.removeprefix(".old_"))
    older = [p for s, p in reversed(list_checkpoints(output_dir))
             if p != first and (step is None or s < int(step.group(1)))]
    return [first, *older]
