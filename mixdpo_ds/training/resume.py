"""The resume contract: a resumed run is the run that was checkpointed, or an error naming what changed.

A checkpoint stores the resolved config and the world size. On resume every key that alters the run (the experts,
gate, EM and loss settings, the data, the model, the batch shape, the world size, max_steps, the schedules, the
seed) must be unchanged; only the keys in `HARMLESS` (logging, evaluation and checkpoint cadence, outputs) may differ.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mixdpo_ds.training import checkpoint as ckpt
from mixdpo_ds.training.distributed import all_ranks_true

log = logging.getLogger("mixdpo_ds")

# Keys that change what is written or how often, never what is trained.
HARMLESS = frozenset({
    "train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.resume_from",
    "train.progress_bar", "train.tensorboard", "train.plots", "train.export", "train.eval_batch_size",
    "train.reference_cache_dir", "train.output_dir", "train.dist_timeout_s", "train.nonfinite",
    # trackers, hub upload and export form; activation checkpointing recomputes the same values; tokenising workers
    "train.report_to", "train.run_name", "train.push_to_hub", "train.hub_model_id", "train.hub_private_repo",
    "train.export_merged", "train.export_format", "train.export_max_shard_size", "train.gradient_checkpointing",
    "train.host_mmap_threshold_mb", "data.num_proc",
})


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_altering_changes(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every run-altering key that differs; configs as `RunConfig.to_dict()`
    plus a top-level "world_size"."""
    a, b = flatten(saved), flatten(now)
    missing = object()
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(a.keys() | b.keys())
            if k not in HARMLESS and a.get(k, missing) != b.get(k, missing)]


def check_resume(saved: dict, now: dict, checkpoint: str | Path) -> None:
    """Raise ValueError listing each changed run-altering key with both values."""
    changes = run_altering_changes(saved, now)
    if changes:
        lines = "\n".join(f"  {k}: {_show(old)} (checkpoint) -> {_show(new)} (now)" for k, old, new in changes)
        raise ValueError(f"cannot resume from {checkpoint}: these settings alter the run and differ from the "
                         f"checkpoint's:\n{lines}\nRestore them, or train into a new train.output_dir (or set "
                         f"train.resume_from=null there). Keys that may change on resume: {sorted(HARMLESS)}")


def _show(v: Any) -> str:
    return "<absent>" if type(v) is object else repr(v)


def load_newest_intact(engine, out_dir: str | Path, first: str | Path, identity: dict) -> tuple[Path, dict]:
    """Load the newest intact checkpoint from `first` down -> (its path, the trainer state). A damaged one (an
    unreadable trainer state or engine file) is named in a warning, skipped and the next older one tried; a config
    that alters the run is refused (`check_resume`), never skipped. Every rank takes the same decision."""
    for path in ckpt.resume_candidates(out_dir, first):
        state, err = None, None
        try:
            state = ckpt.read_trainer_state(path)
        except Exception as e:  # truncated / unreadable: whatever the reader raises
            err = e
        if all_ranks_true(err is None, "cpu"):
            check_resume(state["run"], identity, path)
            try:
                ckpt.load_checkpoint(engine, path)
            except Exception as e:
                err = e
        if not all_ranks_true(err is None, "cpu"):
            log.warning("checkpoint %s is damaged (%s); trying the previous one", path,
                        f"{type(err).__name__}: {err}" if err else "on another rank")
            continue
        ckpt.load_rank_rng(path)
        log.info("resumed from %s at step %d", path, state["step"])
        return Path(path), state
    raise RuntimeError(f"no intact checkpoint to resume from in {ckpt.checkpoints_dir(out_dir)} (each one failed to "
                       "load, see the warnings); set train.resume_from=null to start over")
