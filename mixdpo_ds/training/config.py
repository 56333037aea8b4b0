"""The run configuration: one dataclass composing the per-module configs.

Precedence: dataclass defaults ← YAML file ← `a.b=c` command-line overrides (values parsed as YAML,
so `train.lr=1e-5`, `experts.lr_experts=[1e-4,2e-4]`, `train.resume_from=null` work; `1e-5` is a float
here, unlike plain YAML 1.1).
Unknown keys are errors that name the key and the allowed keys. Every value is checked against its field's
type annotation before the section is built (`train.micro_batch_size='4': expected an integer (int), got str`;
ints are accepted, and made floats, where a float is wanted; floats must be finite; bools are only true/false).
A YAML file with a duplicate key or a syntax error is an error naming the file and the line.
`to_yaml()` writes the fully resolved config, which is what a run directory keeps as `config.yaml` and what
`evaluate` / `generate` reload.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=4", "experts.num_experts=2"])
    print(cfg.to_yaml())
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixdpo_ds.core.em import EMConfig
from mixdpo_ds.model.experts import ExpertsConfig
from mixdpo_ds.model.gating import GateConfig
from mixdpo_ds.training.config_checks import check_fields, is_finite_number, short_repr, yaml_load
from mixdpo_ds.training.config_names import flat_table, merge, nest_flat
from mixdpo_ds.training.config_names import nested_dataclass as _nested_dataclass
from mixdpo_ds.training.data import DataConfig
from mixdpo_ds.training.export_stream import parse_shard_size
from mixdpo_ds.training.fused_step import FUSED_MODES
from mixdpo_ds.training.schedule import SCHEDULES

DTYPES = ("fp32", "bf16")
LR_SCHEDULES = SCHEDULES  # transformers.get_scheduler's names (training/schedule.py)
DEFAULT_LR = 1e-4
REFERENCE_MODES = ("model", "precompute")
LOSS_IMPLS = ("auto", "naive", "triton")
REPORT_TO = ("tensorboard", "wandb", "mlflow")
EXPORT_FORMATS = ("experts", "compact", "both")


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")


@dataclass
class ModelConfig:
    """The base model: the policy is initialised from it and, by default, it is the reference."""

    name_or_path: str = field(default="", metadata={"help": "Hugging Face model name or local directory."})
    dtype: str = field(default="fp32", metadata={"help": f"Model weights dtype, one of {list(DTYPES)}; the loss "
                                                        "math is fp32 either way."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer name or path; default: name_or_path."})
    ref_name_or_path: str | None = field(default=None, metadata={
        "help": "A separate frozen reference model (TRL's ref_model), shared by the K experts; default: the base "
                "(lora: the base with adapters off; models with init_paths: each expert's initial checkpoint)."})

    def __post_init__(self):
        _check_choice("model.dtype", self.dtype, DTYPES)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.name_or_path


@dataclass
class LossConfig:
    """DPO temperature. (Label smoothing, λ's and the posterior correction live in `em`.)"""

    beta: float = field(default=0.1, metadata={"help": "β of the implicit reward h = β (log π − log π_ref); an E.1 "
                                                       "phase may override it."})
    rpo_alpha: float = field(default=0.0, metadata={
        "help": "weight α of RPO's NLL term (TRL's rpo_alpha): + α·mean_i Σ_k q_ik·NLL_k(chosen_i) per token "
                "(mixdpo_ds.core.losses.chosen_nll); keeps samples near the data. 0 = plain (Mix-)DPO."})
    impl: str = field(default="auto", metadata={"help": f"MBT loss implementation, one of {list(LOSS_IMPLS)}: naive "
                                                        "(PyTorch, mixdpo_ds.core.losses), triton (one fused kernel, "
                                                        "kernels/mbt_loss.py), auto (triton on CUDA, else naive)."})
    fused: str = field(default="auto", metadata={
        "help": f"one of {list(FUSED_MODES)}: compute the policy loss inside the heads' forward, chunk of pairs by "
                "chunk, with no logits recompute (docs/math.md §16; training/fused_step.py says where it applies). "
                "auto = wherever it applies, always = an error where it cannot, never = log-probs, then the loss."})

    def __post_init__(self):
        if not (is_finite_number(self.beta) and self.beta > 0):
            raise ValueError(f"loss.beta must be > 0 and finite, got {self.beta!r}")
        if not self.rpo_alpha >= 0:
            raise ValueError(f"loss.rpo_alpha must be >= 0, got {self.rpo_alpha!r}")
        if not is_finite_number(self.rpo_alpha):
            raise ValueError(f"loss.rpo_alpha must be finite, got {self.rpo_alpha!r}")
        _check_choice("loss.impl", self.impl, LOSS_IMPLS)
        _check_choice("loss.fused", self.fused, FUSED_MODES)

    def resolved_impl(self, device) -> str:
        if self.impl != "auto":
            return self.impl
        from mixdpo_ds.kernels import default_impl

        return default_impl(device, fallback="naive")  # triton on CUDA after its self-check


@dataclass
class TrainConfig:
    """Optimisation, logging, checkpointing and reference handling of one run."""

    output_dir: str = field(default="runs/mixdpo", metadata={"help": "Run directory (config, metrics, checkpoints, "
                                                                     "export, plots)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 = derive from `epochs`."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training set when max_steps = -1."})
    micro_batch_size: int = field(default=4, metadata={"help": "Preference pairs per rank per micro step."})
    grad_accum: int = field(default=1, metadata={"help": "Micro steps per optimizer step."})
    eval_batch_size: int | None = field(default=None, metadata={"help": "Pairs per eval batch; default micro_batch."})
    lr: float | None = field(default=None, metadata={
        "help": f"Base learning rate (experts.lr_trunk / lr_experts override per group); null: {DEFAULT_LR}, the "
                "frozen-trunk heads' and lora's default, with a warning for full models (models, trainable trunk), "
                "which usually want 1e-6 to 1e-5 (TRL's DPO default is 1e-6)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW ε of the policy's and the gate's optimizers."})
    nonfinite: str = field(default="stop", metadata={
        "help": "A non-finite loss or gradient: 'stop' (error before the weights change) or 'skip' (drop that "
                "optimizer step and count it; ZeRO-0 only). See training/guard.py."})
    dist_timeout_s: float = field(default=1800.0, metadata={
        "help": "Seconds a collective may wait for the other ranks before the run fails (a frozen or dead rank)."})
    warmup_steps: int | float = field(default=0, metadata={
        "help": "Linear lr warm-up: steps (an integer), or a float in (0, 1) = a ratio of the steps (as transformers "
                "5); overrides warmup_ratio."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warm-up as a fraction of the optimizer steps, used "
                                                               "when warmup_steps = 0 (ceil(ratio × steps))."})
    lr_schedule: str = field(default="constant", metadata={
        "help": f"transformers.get_scheduler's schedule, one of {list(LR_SCHEDULES)} (training/schedule.py)."})
    lr_scheduler_kwargs: dict = field(default_factory=dict, metadata={
        "help": "Extra arguments of the schedule (get_scheduler's scheduler_specific_kwargs), e.g. {min_lr_rate: "
                "0.1} for cosine_with_min_lr, {num_decay_steps: 10} for warmup_stable_decay."})
    gradient_clipping: float | None = field(default=None, metadata={"help": "Overrides the engine JSON's "
                                                                            "gradient_clipping (0 = off)."})
    seed: int = field(default=0, metadata={"help": "Seed of model init noise, data order, random warm-up, Gumbel."})
    log_every: int = field(default=1, metadata={"help": "Steps between metrics.jsonl lines (means over the interval)."})
    eval_every: int = field(default=0, metadata={"help": "Steps between evaluations; 0 = only at the end."})
    save_every: int = field(default=0, metadata={"help": "Steps between checkpoints; 0 = only at the end."})
    keep_last: int = field(default=2, metadata={"help": "Checkpoints kept (older ones are deleted); 0 = keep all."})
    resume_from: str | None = field(default=None, metadata={"help": "Checkpoint dir, 'auto' (latest in output_dir, "
                                                                     "fresh start if none) or null."})
    tensorboard: bool = field(default=False, metadata={"help": "Also write TensorBoard events to output_dir/tb "
                                                               "(the same as 'tensorboard' in report_to)."})
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "Experiment trackers, any of ['tensorboard', 'wandb', 'mlflow'] (training/trackers.py), each "
                "through its own library on rank 0; [] or 'none' = metrics.jsonl only."})
    run_name: str | None = field(default=None, metadata={"help": "Tracker run name; default: the output_dir's name."})
    gradient_checkpointing: bool | str | None = field(default="auto", metadata={
        "help": "Recompute activations in the backward (transformers' activation checkpointing) of every trained "
                "transformer: trainable trunk, models, the base under lora. 'auto' or null: on for those, off for "
                "frozen-trunk heads (no transformer layer trains); true / false: as said."})
    progress_bar: bool = field(default=True, metadata={"help": "tqdm progress bar on rank 0."})
    host_mmap_threshold_mb: int = field(default=4, metadata={
        "help": "CPU runs on glibc (Linux): allocations of at least this many MiB are served by mmap, so a freed "
                "tensor's pages return to the OS at once and the resident memory follows the live tensors "
                "(training/memory.py; glibc's own threshold grows to 32 MiB and keeps freed heap pages). 0 leaves "
                "glibc's default (faster: the threshold costs page faults, 6-15 % of tokens/s measured). Changes no "
                "value that is computed."})
    reference: str = field(default="model", metadata={"help": f"One of {list(REFERENCE_MODES)}: frozen reference "
                                                              "model each step, or log-probs precomputed and cached."})
    reference_cache_dir: str | None = field(default=None, metadata={"help": "Cache dir for precomputed reference "
                                                                            "log-probs; default output_dir/ref_cache."})
    export: bool = field(default=True, metadata={"help": "Export each expert + gate to output_dir/export at the end."})
    export_merged: bool = field(default=False, metadata={
        "help": "lora: also write each expert merged into a full model (export/merged/expert_k); the default "
                "export is K adapters on the base (export/expert_k, loadable with peft.PeftModel)."})
    export_format: str = field(default="experts", metadata={
        "help": f"One of {list(EXPORT_FORMATS)}: experts = K standalone models (export/expert_k); compact = one "
                "trunk + the K heads (export/compact, experts.kind heads only: about 1/K of the bytes); both."})
    export_max_shard_size: str | int = field(default="2GB", metadata={
        "help": "Largest safetensors file of an exported model ('2GB', '500MB' or bytes); bigger models are "
                "sharded with a model.safetensors.index.json, as transformers' save_pretrained does."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the export to the Hugging Face Hub at the end "
                                                               "(huggingface_hub; the token from HF_TOKEN / login)."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository of push_to_hub ('owner/name'); "
                                                                     "default: the output_dir's name."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the push_to_hub repository private."})
    plots: bool = field(default=True, metadata={"help": "Write loss / responsibility plots at the end."})

    def __post_init__(self):
        _check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("train.reference", self.reference, REFERENCE_MODES)
        if self.gradient_checkpointing not in (True, False, None, "auto"):
            raise ValueError(f"train.gradient_checkpointing={self.gradient_checkpointing!r}: must be true, false, "
                             "'auto' or null (= 'auto': on unless experts.kind=heads with a frozen trunk)")
        if not isinstance(self.host_mmap_threshold_mb, int) or self.host_mmap_threshold_mb < 0:
            raise ValueError(f"train.host_mmap_threshold_mb={self.host_mmap_threshold_mb!r}: must be an integer >= 0 "
                             "(MiB; 0 = glibc's default)")
        _check_choice("train.export_format", self.export_format, EXPORT_FORMATS)
        parse_shard_size(self.export_max_shard_size, "train.export_max_shard_size")
        if self.push_to_hub and self.export_format == "compact":
            raise ValueError("train.push_to_hub uploads the expert_k models: train.export_format must be 'experts' "
                             "or 'both' with it, got 'compact'")
        for key in ("micro_batch_size", "grad_accum", "log_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)!r}: must be an integer >= 1")
        if not (is_finite_number(self.warmup_steps) and self.warmup_steps >= 0 and (
                self.warmup_steps < 1 or float(self.warmup_steps).is_integer())):
            raise ValueError(f"train.warmup_steps={self.warmup_steps!r}: must be an integer >= 0 (steps) or a number "
                             "in (0, 1) (a ratio of the steps)")
        for key in ("eval_every", "save_every", "keep_last"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)!r}: must be an integer >= 0 (0 = off)")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"train.eval_batch_size={self.eval_batch_size!r}: must be an integer >= 1, or null "
                             "(= micro_batch_size)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"train.max_steps={self.max_steps!r}: must be >= 1, or -1 (derive from train.epochs)")
        if not is_finite_number(self.epochs) or (self.max_steps == -1 and not self.epochs > 0):
            raise ValueError(f"train.epochs={self.epochs!r}: must be finite, and > 0 when train.max_steps = -1")
        if self.lr is not None and not (is_finite_number(self.lr) and 0 < self.lr < 1e3):
            raise ValueError(f"train.lr={self.lr!r}: must be finite and in (0, 1000) (the AdamW learning rate; "
                             "typical values are 1e-6 to 1e-2)")
        if not (is_finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"train.weight_decay={self.weight_decay!r}: must be finite and >= 0 (AdamW's "
                             "decoupled weight decay)")
        if len(self.adam_betas) != 2 or not all(is_finite_number(b) and 0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"train.adam_betas={self.adam_betas!r}: must be two numbers in [0, 1) (AdamW's "
                             "beta1, beta2: decay rates of the moment estimates)")
        if not (is_finite_number(self.adam_epsilon) and self.adam_epsilon > 0):
            raise ValueError(f"train.adam_epsilon={self.adam_epsilon!r}: must be finite and > 0 (AdamW divides "
                             "by sqrt(v) + epsilon)")
        if self.gradient_clipping is not None and not (is_finite_number(self.gradient_clipping)
                                                       and self.gradient_clipping >= 0):
            raise ValueError(f"train.gradient_clipping={self.gradient_clipping!r}: must be finite and >= 0 "
                             "(0 = off), or null (the engine JSON's value)")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"train.seed={self.seed!r}: must be an integer in [0, 2**63) (numpy and torch seeds "
                             "are non-negative)")
        if not (is_finite_number(self.dist_timeout_s) and self.dist_timeout_s > 0):
            raise ValueError(f"train.dist_timeout_s={self.dist_timeout_s!r}: must be finite and > 0 (seconds a "
                             "collective waits for the other ranks)")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.nonfinite={self.nonfinite!r}: allowed ['stop', 'skip']")
        if not (is_finite_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"train.warmup_ratio={self.warmup_ratio!r}: must be in [0, 1)")
        unknown = [r for r in self.report_to if r not in REPORT_TO]
        if unknown:
            raise ValueError(f"train.report_to={self.report_to!r}: unknown {unknown}; allowed {list(REPORT_TO)}")
        if "tensorboard" in self.report_to:
            self.tensorboard = True  # one writer, MetricsLogger's
        elif self.tensorboard:
            self.report_to = [*self.report_to, "tensorboard"]


@dataclass
class DeepSpeedSection:
    """The DeepSpeed engine: a JSON in ds_configs/ (engine settings only) or an inline dict."""

    config: Any = field(default="zero0", metadata={"help": "Path to a DeepSpeed JSON, a name in ds_configs/ "
                                                          "(e.g. 'zero2'), or an inline dict. Batch keys are derived."})
    zero_stage: int | None = field(default=None, metadata={"help": "Overrides zero_optimization.stage (0..3)."})

    def __post_init__(self):
        if self.zero_stage is not None:
            _check_choice("deepspeed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        if not isinstance(self.config, (str, dict)):
            raise ValueError(f"deepspeed.config must be a path, a ds_configs name or a dict, got {self.config!r}")


# Section name -> dataclass. The order is the order of config.yaml.
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "experts": ExpertsConfig,
    "gate": GateConfig,
    "em": EMConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "deepspeed": DeepSpeedSection,
}


@dataclass
class RunConfig:
    """Everything one `mixdpo train` run needs; see the module docstring for precedence."""

    model: ModelConfig
    data: DataConfig
    experts: ExpertsConfig
    gate: GateConfig
    em: EMConfig
    loss: LossConfig
    train: TrainConfig
    deepspeed: DeepSpeedSection

    def __post_init__(self):
        if self.train.lr is None:
            self.train.lr = DEFAULT_LR
            if self.experts.kind == "models" or (self.experts.kind == "heads" and self.experts.trunk == "trainable"):
                warnings.warn(f"train.lr (MixDPOConfig.learning_rate) is not set: {DEFAULT_LR}, the default of "
                              f"frozen-trunk heads and lora, for experts.kind={self.experts.kind!r} with trainable "
                              "full-model weights; those usually want 1e-6 to 1e-5 (TRL's DPO default is 1e-6)",
                              UserWarning, stacklevel=2)
        if not self.model.name_or_path:
            raise ValueError("model.name_or_path is required (MixDPOConfig.model_name_or_path, mixdpo train "
                             "--model_name_or_path)")
        if self.experts.num_experts > 1 and self.gate.kind == "mix" and self.em.gate_update == "alternate":
            raise ValueError("em.gate_update='alternate' needs gate.kind='moe' (the 'mix' gate is updated in "
                             "closed form); allowed for gate.kind='mix': ['joint', 'frozen']")
        if self.train.export_format != "experts" and self.experts.kind != "heads":
            raise ValueError(f"train.export_format={self.train.export_format!r} (one trunk + K heads) is for "
                             f"experts.kind='heads', not {self.experts.kind!r}; allowed here: ['experts']")

    def to_dict(self) -> dict:
        return {name: _plain(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(path) + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
        return text

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        """Nested sections and/or top-level flat names (training/config_names.py) -> the checked RunConfig."""
        raw = nest_flat(raw, SECTIONS)
        _check_keys(raw, cls)
        return cls(**{name: _build(SECTIONS[name], {} if raw.get(name) is None else raw[name], name)
                      for name in SECTIONS})


def _plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists (yaml.safe_dump writes only plain types)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check_keys(raw: Any, cls: type, prefix: str = "") -> None:
    """Raise on keys of `raw` that `cls` (a dataclass, or RunConfig) does not have, recursing into
    fields whose default is itself a dataclass."""
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix[:-1] if prefix else 'config'} must be a mapping, got {short_repr(raw)}")
    if cls is RunConfig:
        allowed = {name: SECTIONS[name] for name in SECTIONS}
    else:
        allowed = {f.name: _nested_dataclass(f) for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in allowed:
            raise ValueError(f"unknown config key {full!r}; allowed keys{' in ' + prefix[:-1] if prefix else ''}: "
                             f"{sorted(allowed)}")
        if allowed[key] is not None and isinstance(value, dict):
            _check_keys(value, allowed[key], full + ".")


def _build(cls: type, values: dict, section: str):
    _check_keys(values, cls, section + ".")
    return cls(**check_fields(values, cls, section))


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=c", ...] -> nested dict {"a": {"b": yaml_load("c")}}."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] in flat_table(SECTIONS):  # a flat name: learning_rate=1e-5
            value = yaml_load(text, source=f"override {item!r}") if text != "" else None
            out = merge(out, nest_flat({parts[0]: value}, SECTIONS))
            continue
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"override key {key!r} must be section.key (sections: {list(SECTIONS)}) or a flat "
                             "name (mixdpo train --help lists them)")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = yaml_load(text, source=f"override {item!r}") if text != "" else None
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults ← YAML at `path` ← overrides."""
    raw: dict = {}
    if path is not None:
        loaded = yaml_load(Path(path).read_text(), source=str(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections {list(SECTIONS)}")
        raw = loaded
    raw = merge(raw, parse_overrides(overrides or []))
    return RunConfig.from_dict(raw)
