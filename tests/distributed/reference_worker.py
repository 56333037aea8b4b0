"""Runs `MixDPOTrainer` for several run configs in one process group and records where the reference lives.

    python tests/distributed/reference_worker.py OUT MODEL NAME:key=val,key=val ...                 # 1 rank
    deepspeed --num_accelerators 2 --no_local_rank tests/distributed/reference_worker.py OUT MODEL ...

Each NAME runs `configs/tiny.yaml` with the given overrides into OUT/NAME (metrics.jsonl), and every rank writes
OUT/NAME/rank{r}.json after set-up: the reference's class, whether it runs through the policy's own engine, the
FrozenReference models alive in the process, and their parameter bytes: held by this rank (its ZeRO-3 partitions,
or the whole tensor when not partitioned), materialised now (outside any forward) and in full.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def frozen_references() -> list:
    from mixdpo_ds.model.reference import FrozenReference

    return [o for o in gc.get_objects() if isinstance(o, FrozenReference)]


def reference_facts(trainer, before: set[int]) -> dict:
    frozen = [o for o in frozen_references() if id(o) not in before]  # built by this run's set-up
    held = materialised = full = num_params = 0
    for ref in frozen:
        for p in ref.parameters():
            size = p.element_size()
            shard = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition; p.data is empty between forwards
            held += (shard.numel() if shard is not None else p.numel()) * size
            materialised += p.data.numel() * size
            full += getattr(p, "ds_numel", p.numel()) * size
            num_params += 1
    ref = trainer.reference
    return {"reference": type(ref).__name__ if ref is not None else None,
            "tables": trainer.ref_tables is not None,
            "policy_engine": getattr(ref, "engine", None) is trainer.engine,
            "frozen_references": len(frozen), "held_bytes": held, "materialised_bytes": materialised,
            "full_bytes": full, "num_params": num_params}


def run(out: Path, model: str, name: str, overrides: list[str]) -> None:
    from mixdpo_ds.training import distributed as mdist
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.trainer import MixDPOTrainer

    run_dir = out / name
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"model.name_or_path={model}", f"train.output_dir={run_dir}", "train.progress_bar=false",
                       "train.plots=false", "train.gradient_clipping=0", "train.export=false", *overrides])
    trainer = MixDPOTrainer(cfg)
    before = {id(o) for o in frozen_references()}
    trainer.setup()
    facts = reference_facts(trainer, before)
    trainer.train()
    (run_dir / f"rank{mdist.rank()}.json").write_text(json.dumps(facts))
    trainer.cleanup()
    gc.collect()  # the next run's census must not count this run's reference
    mdist.barrier()


if __name__ == "__main__":
    from trainer_worker import main

    main(sys.argv[1:], run)
