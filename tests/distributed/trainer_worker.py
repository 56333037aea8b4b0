"""Runs `MixDPOTrainer` for several run configs in one process group (one launcher start for all of them).

    python tests/distributed/trainer_worker.py OUT MODEL NAME:key=val,key=val ...                 # 1 rank
    deepspeed --num_accelerators 2 --no_local_rank tests/distributed/trainer_worker.py OUT MODEL ...

ZeRO-0 runs also write OUT/NAME/final_state.pt (rank 0): the gate's state and every trainable policy parameter.
Each NAME runs `configs/tiny.yaml` with the given overrides into OUT/NAME. After each run, every rank
computes the engine's (2B, K) log-probs of a fixed batch of 2 pairs (the in-training log-probs; rank r its
shard); rank 0 gathers them and writes OUT/NAME/final_logps.pt, which the test compares with the exported
experts loaded by `from_pretrained`. Also records the head parameter bytes per rank (OUT/NAME/rank{r}.json).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "prompt_last_index")


def final_logps(trainer) -> torch.Tensor:
    """(2B, K) engine log-probs of the first 2·world training pairs (each rank its shard), gathered."""
    from mixdpo_ds.training import distributed as mdist

    world, rank = mdist.world_size(), mdist.rank()
    examples = mdist.shard(trainer.data.train[: 2 * world], rank, world)
    batch = trainer._collate(examples)
    trainer.engine.eval()
    with torch.no_grad():
        logps = trainer.engine(**{k: batch[k] for k in MODEL_KEYS}).logps  # (2·2, K): chosen rows, rejected rows
    parts = [torch.empty_like(logps) for _ in range(world)]
    torch.distributed.all_gather(parts, logps.contiguous())
    indices = [ex["index"] for ex in trainer.data.train[: 2 * world]]
    return torch.cat(parts), indices


def export_max_diff(trainer, export_dir: Path) -> float:
    """max |engine − exported| / max(1, |engine|) over the (2B, K) sequence log-probs of this rank's shard.

    Each exported expert is loaded with `AutoModelForCausalLM.from_pretrained` and scored by hand:
    Σ over response positions t of log_softmax(logits[t-1])[y_t] (labels != -100)."""
    from transformers import AutoModelForCausalLM

    from mixdpo_ds.training import distributed as mdist

    world, rank = mdist.world_size(), mdist.rank()
    batch = trainer._collate(mdist.shard(trainer.data.train[: 2 * world], rank, world))
    with torch.no_grad():
        engine_logps = trainer.engine(**{k: batch[k] for k in MODEL_KEYS}).logps  # (2B, K)
    labels = batch["labels"][:, 1:]  # (2B, T-1): position t-1 predicts token t
    mask = labels != -100
    exported = []
    with mdist.replicated_load(), torch.no_grad():
        for k in range(engine_logps.shape[1]):
            model = AutoModelForCausalLM.from_pretrained(export_dir / f"expert_{k}", dtype=torch.float32).eval()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            tok = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
            exported.append((tok * mask).sum(-1))  # (2B,)
    # relative to |log-prob| (sums over ~30 tokens of ~-8 each: fp32 rounding of two kernels is ~1e-5 absolute)
    return ((torch.stack(exported, dim=1) - engine_logps).abs() / engine_logps.abs().clamp(min=1.0)).max().item()


def run(out: Path, model: str, name: str, overrides: list[str]) -> None:
    from mixdpo_ds.model.parallel import head_param_bytes
    from mixdpo_ds.training import distributed as mdist
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.trainer import MixDPOTrainer

    run_dir = out / name
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"model.name_or_path={model}", f"train.output_dir={run_dir}", "train.progress_bar=false",
                       "train.plots=false", "train.gradient_clipping=0", *overrides])
    trainer = MixDPOTrainer(cfg)
    trainer.setup()
    trainer.train()
    head_bytes = head_param_bytes(trainer.engine.module)
    logps, indices = final_logps(trainer)
    export_diff = export_max_diff(trainer, run_dir / "export") if cfg.train.export else None
    (run_dir / f"rank{mdist.rank()}.json").write_text(json.dumps({"head_param_bytes": head_bytes,
                                                                  "export_max_diff": export_diff}))
    if mdist.rank() == 0:
        torch.save({"logps": logps, "indices": indices}, run_dir / "final_logps.pt")
    if cfg.deepspeed.config == "zero0" and mdist.rank() == 0:  # ZeRO-0: every rank holds the full parameters
        policy = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
        torch.save({"gate": trainer.gate.state_dict(), "policy": policy}, run_dir / "final_state.pt")
    trainer.cleanup()
    mdist.barrier()


def main(argv: list[str], run_one=None) -> None:
    """OUT MODEL NAME:key=val,... ...: one process group, `run_one(out, model, name, overrides)` per spec (default
    `run`; export_worker.py and reference_worker.py pass their own)."""
    from mixdpo_ds.training import distributed as mdist

    torch.set_num_threads(1)
    mdist.init_distributed()
    out, model = Path(argv[0]), argv[1]
    for spec in argv[2:]:
        name, _, rest = spec.partition(":")
        (run_one or run)(out, model, name, [kv.replace("{out}", str(out)) for kv in rest.split(",") if kv])


if __name__ == "__main__":
    main(sys.argv[1:])
