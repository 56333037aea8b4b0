"""`MixDPOConfig`: the run configuration under TRL's `DPOConfig` / transformers' `TrainingArguments` names.

It is not a second configuration: it is generated from the flat-name table of training/config_names.py, one field
per RunConfig key (TRL's name where TRL has the concept, `rule_name` otherwise), so it cannot drift from
`RunConfig`, and every value is checked by the RunConfig sections themselves when the object is made.

    from mixdpo_ds import MixDPOConfig
    args = MixDPOConfig(output_dir="runs/x", learning_rate=5e-5, num_experts=2, per_device_train_batch_size=4)
    cfg = args.to_run_config(model_name_or_path="gpt2")       # the RunConfig the recipe runs
    assert MixDPOConfig.from_run_config(cfg) == args

`help(MixDPOConfig)` lists every field with its help text and RunConfig key; `mixdpo train --help` prints the
same.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from typing import Any

from mixdpo_ds.training.config import SECTIONS, RunConfig
from mixdpo_ds.training.config_names import flat_default, flat_help, flat_table, get_flat, set_flat

FLAT = flat_table(SECTIONS)  # flat name -> (RunConfig key, Alias)
PATH_TO_FLAT: dict[str, list[str]] = {}
for _name, (_leaf, _alias) in FLAT.items():
    PATH_TO_FLAT.setdefault(_leaf.path, []).append(_name)


def flat_names_in(message: str) -> str:
    """'train.lr=…' in an error message -> 'train.lr is MixDPOConfig.learning_rate' for each key it mentions."""
    found = [(p, n) for p, names in PATH_TO_FLAT.items() for n in names
             if re.search(rf"(?<![\w.]){re.escape(p)}(?![\w])", message)]
    return "; ".join(f"{p} is MixDPOConfig.{n}" for p, n in found)


def _to_run_config(self, model_name_or_path: str | None = None, **changes: Any) -> RunConfig:
    """The RunConfig of these arguments; `model_name_or_path` (and any flat `changes`) replace fields first."""
    values = {n: getattr(self, n) for n in FLAT}
    values.update(changes)
    if model_name_or_path is not None:
        values["model_name_or_path"] = model_name_or_path
    raw: dict = {}
    for name, value in values.items():
        set_flat(FLAT, raw, name, value)
    try:
        return RunConfig.from_dict(raw)
    except ValueError as e:
        note = flat_names_in(str(e))
        raise ValueError(f"{e}" + (f" ({note})" if note else "")) from e


def _from_run_config(cls, cfg: RunConfig):
    """The flat view of a RunConfig (`MixDPOConfig.from_run_config(load_config("run.yaml"))`)."""
    return cls(**{n: get_flat(FLAT, cfg, n) for n in FLAT})


def _post_init(self) -> None:
    # Every value is checked now, as DPOConfig does; the model may come later, from the trainer.
    _to_run_config(self, model_name_or_path=self.model_name_or_path or "<the trainer's model>")


def _make_class() -> type:
    fields = []
    for name, (leaf, alias) in FLAT.items():
        default = flat_default(FLAT, name)
        meta = {"help": flat_help(FLAT, name), "path": alias.path}
        spec = dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta) \
            if isinstance(default, (list, dict)) else dataclasses.field(default=default, metadata=meta)
        fields.append((name, alias.type or leaf.field.type, spec))
    doc = ("The run configuration under TRL / transformers names (training/trl_config.py); each field is one "
           "RunConfig key [in brackets]:\n\n" + "\n".join(f"    {n}: {flat_help(FLAT, n)}" for n in FLAT))
    return dataclasses.make_dataclass(
        "MixDPOConfig", fields,
        namespace={"__module__": __name__, "__doc__": doc, "__post_init__": _post_init, "to_run_config": _to_run_config,
                   "from_run_config": classmethod(_from_run_config)})


MixDPOConfig = _make_class()
_generated_init = MixDPOConfig.__init__


def _init(self, *args, **kwargs):
    unknown = [k for k in kwargs if k not in FLAT]
    if unknown:  # a TRL / transformers argument with no counterpart, or a typo: say which, and what is close
        close = {k: difflib.get_close_matches(k, FLAT, n=3) for k in unknown}
        raise TypeError(f"MixDPOConfig: unknown field(s) {unknown}; closest names: {close} (every field: "
                        "help(MixDPOConfig) or mixdpo train --help)")
    _generated_init(self, *args, **kwargs)


MixDPOConfig.__init__ = _init

__all__ = ["FLAT", "MixDPOConfig", "flat_names_in"]
