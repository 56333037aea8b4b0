"""The flat names of the run configuration: TRL / transformers names and one rule for the rest (one table).

`RunConfig` (training/config.py) is the one configuration model; its keys are nested (`train.lr`). This module
gives every key one flat name, which `MixDPOConfig` (training/trl_config.py), the top level of a run YAML and the
command line (`--learning_rate`, `learning_rate=`) accept:

    TRL_NAMES   flat name -> RunConfig key for every concept TRL's DPOConfig or transformers' TrainingArguments
                also has (learning_rate -> train.lr, per_device_train_batch_size -> train.micro_batch_size,
                bf16 -> model.dtype, ...), with converters where the value's form differs
    rule_name   every other key: its field name (`num_experts`, `beta`, `lora_r`), or for the `gate` and `em`
                sections the dotted path with underscores (`gate_lr`, `em_mode`, `em_estep_lambda_w`)

`flat_table` builds the table from the sections and fails on a collision, so a new field either gets a flat
name by rule or the build names the conflict. Nothing here imports config.py (which imports this module).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PREFIXED_SECTIONS = ("gate", "em")  # their field names (kind, lr, mode, ...) would be ambiguous alone


@dataclass(frozen=True)
class Alias:
    """A flat name for one RunConfig key. `path` may end in `[i]` (one item of a list, e.g. adam_betas)."""

    path: str
    to_run: Callable[[Any], Any] | None = None  # flat value -> RunConfig value
    from_run: Callable[[Any], Any] | None = None  # RunConfig value -> flat value
    type: str | None = None  # the flat annotation, when the converters change the value's type
    help: str | None = None  # replaces the RunConfig field's help


def _bool(name: str) -> Callable[[Any], bool]:
    def check(value):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected true or false")
        return value
    return check


def _report_to(value) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    return [] if names in (["none"], []) else names


def _zero_is_none(value):
    return 0 if value is None else value


def _none_is_zero(value):
    return None if value == 0 else value


TRL_NAMES: dict[str, Alias] = {
    "model_name_or_path": Alias("model.name_or_path"),
    "tokenizer_name_or_path": Alias("model.tokenizer"),
    "ref_model_name_or_path": Alias("model.ref_name_or_path"),
    "bf16": Alias("model.dtype", lambda v: "bf16" if _bool("bf16")(v) else "fp32", lambda v: v == "bf16", "bool",
                  "Train in bfloat16 (model.dtype=bf16); false: fp32. The loss math is fp32 either way."),
    "dataset_name": Alias("data.path"),
    "dataset_train_split": Alias("data.split"),
    "eval_dataset_name": Alias("data.eval_path"),
    "dataset_test_split": Alias("data.eval_split"),
    "data_seed": Alias("data.seed"),
    "dataset_config": Alias("data.config_name"),
    "dataset_revision": Alias("data.revision"),
    "dataset_num_proc": Alias("data.num_proc"),
    "expert_kind": Alias("experts.kind"),
    "loss_impl": Alias("loss.impl"),
    "label_smoothing": Alias("em.label_smoothing"),
    "num_train_epochs": Alias("train.epochs"),
    "per_device_train_batch_size": Alias("train.micro_batch_size"),
    "per_device_eval_batch_size": Alias("train.eval_batch_size"),
    "gradient_accumulation_steps": Alias("train.grad_accum"),
    "learning_rate": Alias("train.lr"),
    "adam_beta1": Alias("train.adam_betas[0]", type="float", help="AdamW beta1 (train.adam_betas[0])."),
    "adam_beta2": Alias("train.adam_betas[1]", type="float", help="AdamW beta2 (train.adam_betas[1])."),
    "lr_scheduler_type": Alias("train.lr_schedule"),
    "max_grad_norm": Alias("train.gradient_clipping"),
    "logging_steps": Alias("train.log_every"),
    "eval_steps": Alias("train.eval_every", _zero_is_none, _none_is_zero, "int | None",
                        "Steps between evaluations; null (0) = only at the end."),
    "save_steps": Alias("train.save_every"),
    "save_total_limit": Alias("train.keep_last", _zero_is_none, _none_is_zero, "int | None",
                              "Checkpoints kept (older ones are deleted); null (0) = keep all."),
    "resume_from_checkpoint": Alias("train.resume_from"),
    "disable_tqdm": Alias("train.progress_bar", lambda v: not _bool("disable_tqdm")(v), lambda v: not v, "bool",
                          "No tqdm progress bar (train.progress_bar=false)."),
    "precompute_ref_log_probs": Alias(
        "train.reference", lambda v: "precompute" if _bool("precompute_ref_log_probs")(v) else "model",
        lambda v: v == "precompute", "bool",
        "Compute the reference log-probs once over the data and cache them (train.reference=precompute) instead "
        "of a reference forward every step."),
    "report_to": Alias("train.report_to", _report_to, None, "str | list[str]"),
    "deepspeed": Alias("deepspeed.config"),
}


# ------------------------------------------------------------------------------------------- the table
def nested_dataclass(f: dataclasses.Field) -> type | None:
    """The dataclass type of a field whose default is a dataclass instance (e.g. em.estep), else None."""
    if f.default_factory is not dataclasses.MISSING:
        try:
            value = f.default_factory()
        except TypeError:
            return None
    else:
        value = f.default
    return type(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else None


def merge(base: dict, update: dict) -> dict:
    """Deep merge: dicts merge key by key, anything else in `update` replaces."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass(frozen=True)
class Leaf:
    """One RunConfig key: its dotted path, its dataclass field and the class that holds it."""

    path: str
    field: dataclasses.Field
    owner: type


def run_config_leaves(sections: dict[str, type]) -> list[Leaf]:
    """Every settable key of the run config's `sections`, in config.yaml order (em.estep etc. expanded)."""
    out = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            sub = nested_dataclass(f)
            if sub is not None:
                walk(sub, f"{prefix}{f.name}.")
            else:
                out.append(Leaf(f"{prefix}{f.name}", f, cls))
    for name, cls in sections.items():
        walk(cls, name + ".")
    return out


def base_path(path: str) -> str:
    """'train.adam_betas[0]' -> 'train.adam_betas'."""
    return re.sub(r"\[\d+\]$", "", path)


def _index(path: str) -> int | None:
    m = re.search(r"\[(\d+)\]$", path)
    return None if m is None else int(m.group(1))


def rule_name(path: str) -> str:
    """The flat name of a key without a TRL name: its field name, or (gate, em) the path with underscores."""
    section, rest = path.split(".", 1)
    return path.replace(".", "_") if section in PREFIXED_SECTIONS else rest.replace(".", "_")


_TABLES: dict[int, dict[str, tuple[Leaf, Alias]]] = {}


def flat_table(sections: dict[str, type], names: dict[str, Alias] | None = None) -> dict[str, tuple[Leaf, Alias]]:
    """Flat name -> (RunConfig key, how it maps): `names` (default TRL_NAMES) first, then every other key by
    `rule_name`. Raises on a name pointing nowhere and on two keys with one flat name (a new field that collides)."""
    if names is None and id(sections) in _TABLES:
        return _TABLES[id(sections)]
    cache, names = names is None, TRL_NAMES if names is None else names
    leaves = {leaf.path: leaf for leaf in run_config_leaves(sections)}
    for name, alias in names.items():
        if base_path(alias.path) not in leaves:
            raise AssertionError(f"{name!r} points at {alias.path!r}, not a RunConfig key")
    aliased = {base_path(a.path) for a in names.values()}
    table = {name: (leaves[base_path(a.path)], a) for name, a in names.items()}
    for path, leaf in leaves.items():
        if path in aliased:
            continue
        name = rule_name(path)
        if name in table:
            raise AssertionError(f"flat name {name!r} of {path!r} is taken by {table[name][1].path!r}; add a "
                                 "TRL_NAMES entry")
        table[name] = (leaf, Alias(path))
    if cache:
        _TABLES[id(sections)] = table
    return table


def leaf_default(leaf: Leaf) -> Any:
    f = leaf.field
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def flat_default(table: dict, name: str) -> Any:
    """The default of flat `name`: its RunConfig key's default, converted."""
    leaf, alias = table[name]
    value = leaf_default(leaf)
    if (i := _index(alias.path)) is not None:
        value = value[i]
    return alias.from_run(value) if alias.from_run is not None else value


def flat_help(table: dict, name: str) -> str:
    leaf, alias = table[name]
    return f"{alias.help or leaf.field.metadata.get('help', '')} [{alias.path}]"


# ------------------------------------------------------------------------------------------- flat <-> nested
def set_flat(table: dict, raw: dict, name: str, value: Any) -> None:
    """Put flat `name`'s `value` into the nested dict `raw` (in place), converted."""
    leaf, alias = table[name]
    value = alias.to_run(value) if alias.to_run is not None else value
    *sections, key = leaf.path.split(".")
    node = raw
    for s in sections:
        node = node.setdefault(s, {})
        if not isinstance(node, dict):
            raise ValueError(f"{name}: {s!r} is set to {node!r}, not a mapping")
    if (i := _index(alias.path)) is not None:  # one item of a list: the rest keeps its current (or default) value
        current = list(node.get(key) or leaf_default(leaf))
        current[i] = value
        value = current
    node[key] = value


def get_flat(table: dict, cfg: Any, name: str) -> Any:
    """Flat `name`'s value in a built run config."""
    leaf, alias = table[name]
    node: Any = cfg
    for part in leaf.path.split("."):
        node = getattr(node, part)
    if (i := _index(alias.path)) is not None:
        node = node[i]
    node = list(node) if isinstance(node, tuple) else node
    return alias.from_run(node) if alias.from_run is not None else node


def is_flat_key(table: dict, sections: dict, key: str, value: Any) -> bool:
    """A top-level key of a run mapping that is a flat name (`deepspeed: zero2`), not a section
    (`deepspeed: {config: zero2}`)."""
    return key in table and not (key in sections and (isinstance(value, dict) or value is None))


def nest_flat(raw: Any, sections: dict[str, type]) -> Any:
    """Top-level flat names of a run mapping -> the nested form; sections pass through. Flat names are applied
    after the sections of the same mapping (a YAML with both `learning_rate` and `train: {lr}` takes the flat)."""
    if not isinstance(raw, dict):
        return raw
    table = flat_table(sections)
    flat = {k: v for k, v in raw.items() if is_flat_key(table, sections, k, v)}
    if not flat:
        return raw
    update: dict = {}
    for key, value in flat.items():
        set_flat(table, update, key, value)
    return merge({k: v for k, v in raw.items() if k not in flat}, update)
