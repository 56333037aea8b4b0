"""Trains tiny runs under ZeRO-3 and exports them with every `GatheredParameters` counted (one launcher start).

    deepspeed --num_accelerators 2 --no_local_rank tests/distributed/export_worker.py OUT MODEL NAME:key=val,...

Each NAME runs `configs/tiny.yaml` with the overrides, at ZeRO-3 with `stage3_param_persistence_threshold` 0
(every parameter partitioned, however small), 3 steps, then `trainer.export()` while `deepspeed.zero.
GatheredParameters` is replaced by a subclass that counts the elements gathered at once (the largest sum over the
contexts open together). Rank r writes OUT/NAME/rank{r}.json: that peak, the largest own-parameter count of one
module (`bound`: one module's parameters, or the inputs of one expert head), the model's total, the number of
gathers, and the export's log-prob error against the engine for the expert directories (from_pretrained) and for
compact/ (load_compact).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))


def counting_gather():
    """A GatheredParameters subclass recording the peak number of elements gathered at once."""
    import deepspeed

    class Counting(deepspeed.zero.GatheredParameters):
        open_numel = peak = calls = 0

        def __enter__(self):
            n = sum(p.ds_numel for p in self.params) if self.enabled else 0
            Counting.open_numel += n
            Counting.peak = max(Counting.peak, Counting.open_numel)
            Counting.calls += bool(n)
            self._counted = n
            return super().__enter__()

        def __exit__(self, *exc):
            Counting.open_numel -= self._counted
            return super().__exit__(*exc)

    return Counting


def gather_bound(policy) -> int:
    """The most elements one step of the streamed export may gather: one module's own parameters, or one head's
    inputs (the (K, V, H) heads, or A, B and the shared W of low-rank heads)."""
    from mixdpo_ds.training.export_stream import head_inputs

    own = max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in policy.modules())
    head = sum(p.ds_numel for p in head_inputs(policy)) if policy.kind == "heads" else 0
    if policy.kind == "lora":   # a merged layer: its base weight + adapter k's A and B (all of adapter k at most)
        head = own + max(sum(p.ds_numel for n, p in policy.lora_model.named_parameters() if f".{a}." in f".{n}.")
                         for a in policy.adapter_names)
    return max(own, head)


def lora_max_diff(trainer, export_dir: Path) -> float:
    """max relative |engine − exported| over this rank's (2B, K) log-probs, for both lora forms: adapter k merged
    into its base by `load_expert` (peft), and merged/expert_k loaded with from_pretrained."""
    from trainer_worker import MODEL_KEYS
    from transformers import AutoModelForCausalLM

    from mixdpo_ds.training import distributed as mdist
    from mixdpo_ds.training.export import load_expert

    world, rank = mdist.world_size(), mdist.rank()
    batch = trainer._collate(mdist.shard(trainer.data.train[: 2 * world], rank, world))
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    with torch.no_grad():
        engine_logps = trainer.engine(**{k: batch[k] for k in MODEL_KEYS}).logps           # (2B, K)
        worst = 0.0
        with mdist.replicated_load():
            for k in range(engine_logps.shape[1]):
                for model in (load_expert(str(export_dir), k),
                              AutoModelForCausalLM.from_pretrained(export_dir / "merged" / f"expert_{k}").eval()):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    tok = logits[:, :-1].float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
                    diff = ((tok * mask).sum(-1) - engine_logps[:, k]).abs() / engine_logps[:, k].abs().clamp(min=1)
                    worst = max(worst, diff.max().item())
    return worst


def owning_modules(policy) -> int:
    """Modules that own a parameter no earlier module owns (a tied head's owner owns nothing new)."""
    seen, count = set(), 0
    for m in policy.modules():
        own = {id(p) for p in m.parameters(recurse=False)} - seen
        count += bool(own)
        seen |= own
    return count


def compact_max_diff(trainer, export_dir: Path) -> float:
    """max |engine − load_compact| / max(1, |engine|) over this rank's (2B, K) log-probs."""
    from trainer_worker import MODEL_KEYS

    from mixdpo_ds.training import distributed as mdist
    from mixdpo_ds.training.export import load_compact

    world, rank = mdist.world_size(), mdist.rank()
    batch = trainer._collate(mdist.shard(trainer.data.train[: 2 * world], rank, world))
    with torch.no_grad():
        engine_logps = trainer.engine(**{k: batch[k] for k in MODEL_KEYS}).logps           # (2B, K)
        with mdist.replicated_load():
            compact = load_compact(str(export_dir), logprob_impl="naive")
        logps = compact(**{k: batch[k] for k in MODEL_KEYS}).logps
    return ((logps - engine_logps).abs() / engine_logps.abs().clamp(min=1.0)).max().item()


def run(out: Path, model: str, name: str, overrides: list[str]) -> None:
    import deepspeed
    from trainer_worker import export_max_diff

    from mixdpo_ds.training import distributed as mdist
    from mixdpo_ds.training.config import load_config
    from mixdpo_ds.training.trainer import MixDPOTrainer

    run_dir = out / name
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"model.name_or_path={model}", f"train.output_dir={run_dir}", "train.progress_bar=false",
                       "train.plots=false", "train.gradient_clipping=0", "train.max_steps=3", "train.save_every=0",
                       "train.micro_batch_size=2", "train.export=false", *overrides])
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0     # partition every parameter
    cfg.deepspeed.config = ds
    trainer = MixDPOTrainer(cfg)
    trainer.setup()
    trainer.train()
    policy = trainer.engine.module
    original, counting = deepspeed.zero.GatheredParameters, counting_gather()
    deepspeed.zero.GatheredParameters = counting
    try:
        trainer.export()
    finally:
        deepspeed.zero.GatheredParameters = original
    export = run_dir / "export"
    layout = json.loads((export / "export.json").read_text())["layout"]
    record = {"peak": counting.peak, "calls": counting.calls, "bound": gather_bound(policy),
              "total": sum(p.ds_numel for p in policy.parameters()), "layout": layout,
              "modules": owning_modules(policy),
              "experts_diff": (lora_max_diff if cfg.experts.kind == "lora" else export_max_diff)(trainer, export)
              if "experts" in layout else None,
              "compact_diff": compact_max_diff(trainer, export) if "compact" in layout else None}
    (run_dir / f"rank{mdist.rank()}.json").write_text(json.dumps(record))
    trainer.cleanup()
    mdist.barrier()


if __name__ == "__main__":
    from trainer_worker import main

    main(sys.argv[1:], run)
