"""The TRL-shaped front of the recipe: `MixDPOTrainer(model=..., args=MixDPOConfig(...), train_dataset=...)`.

A TRL `DPOTrainer` script becomes a K-expert run by changing three lines (README "Coming from TRL"):

    from mixdpo_ds import MixDPOConfig, MixDPOTrainer                     # was: from trl import DPOConfig, DPOTrainer
    args = MixDPOConfig(output_dir="runs/x", num_experts=2, ...)          # was: DPOConfig(...)
    trainer = MixDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                            peft_config=LoraConfig(r=8, target_modules=["c_attn"]))   # was: DPOTrainer(...)
    result = trainer.train()           # TrainOutput(global_step, training_loss, metrics)
    trainer.save_model()               # export/: K adapters (lora) or K models, the gate, model cards
    trainer.evaluate(); trainer.push_to_hub()

How the in-memory inputs reach the recipe (`training/trainer.py`, which runs from a RunConfig of paths): a loaded
model, reference model and tokenizer are written with `save_pretrained`, and in-memory `datasets.Dataset`s with
`save_to_disk`, under `output_dir/inputs/` (rank 0; the other ranks wait), and the RunConfig points at them. So the
run directory holds everything `evaluate` / `generate` / resume need, at the cost of one copy of the base model on
disk. A name or path is passed through as is. `peft_config` (a `peft.LoraConfig`) makes `lora` experts with its r,
lora_alpha, lora_dropout and target_modules.

`MixDPOTrainer(cfg)` with a RunConfig is the recipe itself (the CLI's path); every attribute of the recipe
(`engine`, `data`, `step`, `setup`, …) is reachable on this object.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from mixdpo_ds.training.callbacks import TrainerCallback
from mixdpo_ds.training.config import RunConfig
from mixdpo_ds.training.trl_config import MixDPOConfig

log = logging.getLogger("mixdpo_ds")
# LoraConfig fields the `lora` experts carry; the others must keep peft's defaults (or are irrelevant: task_type).
_LORA_FIELDS = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                "target_modules": "lora_target_modules"}
_LORA_IGNORED = {"task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}


_STARTED = time.time()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _write_once(path: Path, write, key: str | None = None, timeout_s: float = 1800.0) -> str:
    """`write(tmp_dir)` on rank 0 into path (atomically, replacing an older copy); other ranks wait for it. With a
    `key` (a Dataset's fingerprint) a copy written under the same key is kept, and with it the tokenisation cache
    next to it (training/data_cache.py)."""
    done = path / ".complete"
    if key is not None and done.is_file() and done.read_text() == key:
        return str(path.resolve())
    if _rank() == 0:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(str(tmp))
        (tmp / ".complete").write_text(key if key is not None else str(time.time()))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    else:
        deadline = time.monotonic() + timeout_s

        def fresh() -> bool:  # rank 0's copy of this run, not an older one (same key, or written since we started)
            return done.is_file() and (done.read_text() == key if key is not None
                                       else done.stat().st_mtime >= _STARTED - 1)
        while not fresh():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: rank 0 did not write the trainer's inputs within {timeout_s:.0f} s")
            time.sleep(0.5)
    return str(path.resolve())


def _model_path(model, name: str, inputs: Path) -> str | None:
    """A name/path as is; a loaded PreTrainedModel saved under inputs/name."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return None if model is None else str(model)
    if hasattr(model, "peft_config"):
        raise ValueError(f"{name}: a PeftModel; pass the base model and its LoraConfig as peft_config= (the K "
                         "experts are K adapters made from it)")
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"{name}: expected a model name, a path or a transformers PreTrainedModel, got "
                         f"{type(model).__name__}")
    return _write_once(inputs / name, lambda d: model.save_pretrained(d, safe_serialization=True))


def _dataset_path(dataset, name: str, inputs: Path) -> str | None:
    """A name/path as is; a datasets.Dataset saved with save_to_disk under inputs/name."""
    import datasets

    if dataset is None or isinstance(dataset, (str, os.PathLike)):
        return None if dataset is None else str(dataset)
    if isinstance(dataset, (datasets.DatasetDict, dict)):
        raise ValueError(f"{name}: a DatasetDict / dict of splits; pass one split (e.g. dataset['train'])")
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"{name}: expected a datasets.Dataset, a dataset name or a path, got "
                         f"{type(dataset).__name__} (an IterableDataset is not supported)")
    return _write_once(inputs / name, lambda d: dataset.save_to_disk(d), key=f"dataset:{dataset._fingerprint}")


def lora_changes(peft_config) -> dict[str, Any]:
    """A peft.LoraConfig -> the MixDPOConfig fields of `lora` experts; settings the experts cannot carry are errors."""
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise ValueError(f"peft_config: only a peft.LoraConfig is supported, got {type(peft_config).__name__}")
    default = LoraConfig()
    unsupported = [f for f, v in vars(peft_config).items() if f not in _LORA_FIELDS and f not in _LORA_IGNORED
                   and not f.startswith("_") and v != getattr(default, f, v)]
    if unsupported:
        raise ValueError(f"peft_config: {unsupported} differ from peft's defaults; the lora experts take only "
                         f"{sorted(_LORA_FIELDS)} (bias='none', no modules_to_save)")
    targets = peft_config.target_modules
    if isinstance(targets, str):
        raise ValueError(f"peft_config.target_modules={targets!r}: a regex is not supported, give a list of names")
    return {"expert_kind": "lora", "lora_r": peft_config.r, "lora_alpha": int(peft_config.lora_alpha),
            "lora_dropout": float(peft_config.lora_dropout),
            "lora_target_modules": sorted(targets) if targets is not None else None}


def resolve_trl_inputs(model, ref_model, args, train_dataset, eval_dataset, processing_class,
                       peft_config) -> RunConfig:
    """The TRL-shaped arguments -> the RunConfig of the recipe (in-memory objects written under inputs/)."""
    args = args if args is not None else MixDPOConfig()
    if not isinstance(args, MixDPOConfig):
        raise ValueError(f"args: expected a MixDPOConfig, got {type(args).__name__} (a trl DPOConfig's fields map "
                         "onto MixDPOConfig under the same names)")
    inputs = Path(args.output_dir) / "inputs"
    changes: dict[str, Any] = {}
    model_path = _model_path(model, "model", inputs) or args.model_name_or_path
    if not model_path:
        raise ValueError("model: give a model name, a path or a loaded PreTrainedModel")
    if processing_class is not None:
        if not hasattr(processing_class, "save_pretrained"):
            raise ValueError(f"processing_class: expected a tokenizer, got {type(processing_class).__name__}")
        changes["tokenizer_name_or_path"] = _write_once(inputs / "tokenizer",
                                                        lambda d: processing_class.save_pretrained(d))
    elif not isinstance(model, (str, os.PathLike)) and model is not None and not args.tokenizer_name_or_path:
        raise ValueError("processing_class: a loaded model carries no tokenizer; pass processing_class=tokenizer")
    if (ref := _model_path(ref_model, "ref_model", inputs)) is not None:
        if peft_config is not None:
            raise ValueError("ref_model with peft_config: the reference of lora experts is the base model with the "
                             "adapters off (as in TRL); pass one or the other")
        changes["ref_model_name_or_path"] = ref
    if peft_config is not None:
        changes.update(lora_changes(peft_config))
    if (train := _dataset_path(train_dataset, "train_dataset", inputs)) is not None:
        changes["dataset_name"] = train
    if (evals := _dataset_path(eval_dataset, "eval_dataset", inputs)) is not None:
        changes.update(eval_dataset_name=evals, dataset_test_split=args.dataset_test_split or "train",
                       eval_fraction=0.0)
    return args.to_run_config(model_name_or_path=model_path, **changes)


class _History(TrainerCallback):
    """on_log rows (TrainerState.log_history-like) and the sum of the step losses for TrainOutput.training_loss
    (kept as a tensor on the device: no sync per step)."""

    def __init__(self):
        self.log_history: list[dict] = []
        self.loss_sum, self.steps = 0.0, 0

    def on_step_end(self, trainer, step, record) -> None:
        if not record.skipped and "loss" in record.metrics:
            self.loss_sum = self.loss_sum + record.metrics["loss"].detach()
            self.steps += 1

    def mean_loss(self) -> float:
        return float(self.loss_sum) / self.steps if self.steps else float("nan")

    def on_log(self, trainer, step, metrics) -> None:
        self.log_history.append({**metrics, "step": step})

    def on_evaluate(self, trainer, step, metrics) -> None:
        self.log_history.append({**{f"eval_{k}": v for k, v in metrics.items()}, "step": step})


class MixDPOTrainer:
    """TRL's DPOTrainer signature over the Mix-DPO recipe; see the module docstring."""

    def __init__(self, model=None, ref_model=None, args: MixDPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None, callbacks=None):
        from mixdpo_ds.training.trainer import MixDPOTrainer as Recipe

        if data_collator is not None:
            raise ValueError("data_collator: not supported; batches are collated by training/batch.py")
        if isinstance(model, RunConfig):
            cfg = model
        else:
            cfg = resolve_trl_inputs(model, ref_model, args, train_dataset, eval_dataset, processing_class,
                                     peft_config)
        self.args = MixDPOConfig.from_run_config(cfg)  # the arguments of this run: inputs resolved to their paths
        self.history = _History()
        self.recipe = Recipe(cfg, callbacks=[self.history, *(callbacks or [])])
        self.recipe.args = self.args  # what transformers callbacks get as `args`
        self._set_up = False

    def __getattr__(self, name: str):
        if name == "recipe":  # not set yet (a failed __init__)
            raise AttributeError(name)
        return getattr(self.recipe, name)

    @property
    def cfg(self) -> RunConfig:
        return self.recipe.cfg

    def setup(self) -> None:
        if not self._set_up:
            self.recipe.setup()
            self._set_up = True

    def train(self, resume_from_checkpoint: str | bool | None = None):
        """Set up (once) and train; -> transformers' TrainOutput(global_step, training_loss, metrics)."""
        from transformers.trainer_utils import TrainOutput

        if resume_from_checkpoint is not None:
            if self._set_up:
                raise ValueError("resume_from_checkpoint: the trainer is already set up; pass it to the first train()")
            self.recipe.cfg.train.resume_from = "auto" if resume_from_checkpoint is True else resume_from_checkpoint
        start = time.perf_counter()
        self.setup()
        self.recipe.train()
        lock = getattr(self.recipe, "_lock", None)
        if lock is not None:  # the run is over: another trainer may use output_dir; the engine stays for evaluate()
            lock.release()
        runtime = time.perf_counter() - start
        loss = self.history.mean_loss()
        metrics = {"train_runtime": runtime, "train_loss": loss, "train_steps_per_second": self.step / runtime,
                   "epoch": self.epoch + self.batch_in_epoch / max(1, self.batches_per_epoch)}
        return TrainOutput(self.step, loss, metrics)

    @property
    def log_history(self) -> list[dict]:
        return self.history.log_history

    @property
    def policy(self):
        """The trained MixturePolicy (K experts; lora: one PeftModel with adapters expert_0..expert_{K-1})."""
        self.setup()
        from mixdpo_ds.model.parallel import dense_policy

        return dense_policy(self.recipe.engine.module)

    @property
    def model(self):
        return self.policy

    def expert_model(self, k: int):
        """Expert k as a standalone causal LM on the CPU (lora: adapter k merged into a copy of the base)."""
        return self.policy.expert_model(k)

    def evaluate(self) -> dict[str, float]:
        """Mean metrics over the eval split (as `eval/...`); {} without eval data."""
        self.setup()
        return self.recipe.evaluate()

    def save_model(self, output_dir: str | None = None) -> Path:
        """Export the K experts, the gate and the model cards to output_dir (default: the run's export/)."""
        self.setup()
        if output_dir is None:
            return self.recipe.export()
        from mixdpo_ds.training.export import export_from_engine

        r = self.recipe
        return export_from_engine(r.engine.module, r.gate, Path(output_dir), r.tokenizer, r.data.user_vocab,
                                  r.zero_stage, r.rank, cfg=r.cfg)

    def push_to_hub(self, repo_id: str | None = None, commit_message: str = "Mix-DPO experts", **kwargs) -> str:
        """Upload the export (written first if missing) to the Hub: training/hub.py."""
        from mixdpo_ds.training.hub import push_export

        export = self.recipe.out_dir / "export"
        if not (export / "export.json").is_file():
            self.save_model()
        repo = repo_id or self.cfg.train.hub_model_id or self.recipe.out_dir.name
        return push_export(export, repo, private=self.cfg.train.hub_private_repo, commit_message=commit_message,
                           **kwargs)

    def cleanup(self) -> None:
        self.recipe.cleanup()
        self._set_up = False


__all__ = ["MixDPOTrainer", "lora_changes", "resolve_trl_inputs"]
