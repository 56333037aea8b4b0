"""The DeepSpeed config: engine settings from ds_configs/*.json + batch keys derived from the run config.

The JSON files hold engine settings only (ZeRO stage, offload, gradient clipping). Everything that the run
config already says is derived here, in one place, and a JSON that says something different is an error:

    train_micro_batch_size_per_gpu = train.micro_batch_size
    gradient_accumulation_steps    = train.grad_accum
    train_batch_size               = micro × accum × world_size
    bf16.enabled                   = (model.dtype == "bf16")
    gradient_clipping              = train.gradient_clipping if set, else the JSON's (which must set it:
                                     DeepSpeed 0.19.8 silently defaults to 1.0, docs/deepspeed.md §3)

The optimizer and lr schedule are built by the trainer (torch AdamW with one param group per expert, so
each expert can have its own lr) and handed to `deepspeed.initialize`; a JSON `optimizer` / `scheduler`
section is therefore an error rather than something silently ignored.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
_PKG = Path(__file__).resolve().parent.parent  # mixdpo_ds/
# the repository checkout (editable install) or the installed package copy (setup.py maps ds_configs/ into it)
DS_CONFIG_DIRS = (_PKG.parent / "ds_configs", _PKG / "ds_configs")


def resolve_engine_path(spec: str) -> Path:
    """A path (absolute or relative to the cwd), or a name in ds_configs/ with or without `.json`."""
    p = Path(spec)
    if p.is_file():
        return p
    names = [spec] if spec.endswith(".json") else [spec, spec + ".json"]
    for d in DS_CONFIG_DIRS:
        for name in names:
            if (d / name).is_file():
                return d / name
    available = sorted({q.stem for d in DS_CONFIG_DIRS if d.is_dir() for q in d.glob("*.json")})
    raise FileNotFoundError(f"deepspeed.config={spec!r} is neither a file nor a name in ds_configs/ "
                            f"(available: {available})")


def load_engine_config(spec: str | dict) -> dict:
    """The engine JSON as a dict (a deep copy when `spec` is already a dict)."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    path = resolve_engine_path(spec)
    with open(path) as f:
        return json.load(f)


def _set_or_check(ds: dict, key: str, value: Any, source: str) -> None:
    if key in ds and ds[key] not in ("auto", value):
        raise ValueError(f"DeepSpeed config sets {key}={ds[key]!r} but the run config gives {value!r} (from {source}); "
                         f"remove {key} from the JSON: batch keys are derived from the run config")
    ds[key] = value


def build_deepspeed_config(
    engine: str | dict,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    dtype: str = "fp32",
    zero_stage: int | None = None,
    gradient_clipping: float | None = None,
) -> dict:
    """Engine JSON + derived keys -> the dict passed to `deepspeed.initialize(config=...)`.

    Raises ValueError when the JSON conflicts with the run config (batch keys, bf16/fp16, optimizer or
    scheduler sections) or when gradient clipping is not set anywhere.
    """
    ds = load_engine_config(engine)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"DeepSpeed config has an {key!r} section; the trainer builds the optimizer and lr "
                             f"schedule (per-expert param groups, train.lr / train.lr_schedule): remove it")
    _set_or_check(ds, "train_micro_batch_size_per_gpu", micro_batch_size, "train.micro_batch_size")
    _set_or_check(ds, "gradient_accumulation_steps", grad_accum, "train.grad_accum")
    _set_or_check(ds, "train_batch_size", micro_batch_size * grad_accum * world_size,
                  f"train.micro_batch_size × train.grad_accum × world_size {world_size}")

    want_bf16 = dtype == "bf16"
    bf16 = dict(ds.get("bf16") or {})
    if "enabled" in bf16 and bf16["enabled"] not in ("auto", want_bf16):
        raise ValueError(f"DeepSpeed config sets bf16.enabled={bf16['enabled']!r} but model.dtype={dtype!r}")
    bf16["enabled"] = want_bf16
    ds["bf16"] = bf16
    if (ds.get("fp16") or {}).get("enabled") is True:
        raise ValueError("DeepSpeed config enables fp16; use model.dtype=bf16 (fp16 loss scaling is not supported)")
    ds.pop("fp16", None)

    zero = dict(ds.get("zero_optimization") or {})
    if zero_stage is not None:
        zero["stage"] = zero_stage
    zero.setdefault("stage", 0)
    ds["zero_optimization"] = zero
    # The optimizer is a plain torch AdamW; ZeRO refuses non-DeepSpeed optimizers unless told otherwise.
    ds.setdefault("zero_allow_untested_optimizer", True)

    if gradient_clipping is not None:
        ds["gradient_clipping"] = float(gradient_clipping)
    if "gradient_clipping" not in ds:
        raise ValueError("gradient_clipping is not set: put it in the DeepSpeed JSON or set train.gradient_clipping "
                         "(0 = off); DeepSpeed would silently default to 1.0")
    ds.setdefault("steps_per_print", 10**9)  # our own logging; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage_of(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))

