"""Every use of a third-party private API in mixdpo-ds, in one place.

Tested with deepspeed 0.19.8, transformers 5.24.0, peft 0.21.2 and datasets 5.2.0 (the upper bounds in setup.py).
Before raising a bound, check each entry below against the new release; the tests that exercise it are named.

deepspeed (0.19.8)
  - `deepspeed.moe.sharded_moe._AllToAll`: the autograd all-to-all of DeepSpeed's MoE layer -> `all_to_all`
    (tests/distributed/test_expert_parallel.py).
  - `deepspeed.utils.groups._get_expert_parallel_group_dict`, `._create_expert_and_data_parallel`,
    `._get_expert_parallel_group`: the expert / expert-data-parallel process groups that `deepspeed.initialize`
    creates for MoE layers -> `expert_parallel_group` (tests/distributed/test_expert_parallel.py).
  - `param.ds_id`, `param.ds_tensor`: attributes of a ZeRO-3 partitioned parameter (its id; this rank's
    partition) -> `is_zero3_partitioned`, `local_numel` (tests/distributed/test_experts_zero3.py).
  - Not wrappable, kept in `mixdpo_ds.model.parallel`: `ExpertParallelHeads` subclasses `deepspeed.moe.layer.MoE`
    without calling `MoE.__init__`, so it sets the attributes DeepSpeed's engine reads from a MoE layer
    (`ep_size`, `num_experts`, `num_local_experts`, `expert_group_name`, `use_residual`,
    `enable_expert_tensor_parallelism`, `deepspeed_moe.experts.deepspeed_experts`, `deepspeed_moe._set_ep_group`,
    `set_deepspeed_parallelism`). A DeepSpeed release that reads another attribute breaks there.

transformers (5.24.0)
  - `deepspeed.ops.__compatible_ops__`: the op-compatibility dict `build_shm_op` reads; one process marks the shm
    all-reduce op incompatible so it is not JIT-compiled -> `deepspeed_shm_comm_disabled`
  - `transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref`: the module global behind
    `is_deepspeed_zero3_enabled()`; transformers can unset it but not restore it -> `hf_deepspeed_config_suspended`
    (tests/distributed/test_trainer_distributed.py, ZeRO-3 with a frozen reference).

peft (0.21.2)
  - `peft.tuners.tuners_utils.BaseTunerLayer` (the class of every LoRA layer) -> `lora_layers`.
  - `BaseTunerLayer._active_adapter`, `BaseTunerLayer._disable_adapters`: written directly, not through
    `set_adapter` / `enable_adapters`, which also flip `requires_grad` of the inactive adapters (ZeRO-1/2's
    gradient hooks need requires_grad fixed between a forward and its backward) -> `set_lora_active`,
    `set_lora_disabled` (tests/unit/test_experts.py, kind `lora`).

datasets (5.2.0)
  - `Dataset._fingerprint`: the hash `datasets` keeps of a loaded hub dataset -> `dataset_fingerprint`
    (the reference-logp cache key of hub sources, mixdpo_ds.training.data).

This module imports nothing from mixdpo_ds, and each third-party package only inside the function that needs it.
"""
from __future__ import annotations

import contextlib

# ------------------------------------------------------------------------------------------------ deepspeed


def all_to_all(group, x):
    """DeepSpeed's differentiable all-to-all over dim 0 of `x` within `group` (backward: the inverse all-to-all)."""
    from deepspeed.moe.sharded_moe import _AllToAll

    return _AllToAll.apply(group, x)


def expert_parallel_group(name: str, ep_size: int):
    """This rank's expert-parallel process group `name` of size `ep_size`, created with its expert-data-parallel
    groups (DeepSpeed's E + D layout) the first time it is asked for."""
    from deepspeed.utils import groups

    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def is_zero3_partitioned(param) -> bool:
    """True for a parameter ZeRO-3 has partitioned (its local `.data` may be empty)."""
    return hasattr(param, "ds_id")


def local_numel(param) -> int:
    """Elements of `param` this rank holds: its ZeRO-3 partition, else the whole tensor."""
    return (param.ds_tensor if hasattr(param, "ds_tensor") else param).numel()


# --------------------------------------------------------------------------------------------- transformers


@contextlib.contextmanager
def deepspeed_shm_comm_disabled():
    """Inside the block DeepSpeed's torch backend does not build its CPU shared-memory all-reduce op
    (`deepspeed_shm_comm`, C++ JIT-compiled on first use: 40 s+ on a new machine), which one process never uses:
    `deepspeed.ops.__compatible_ops__` (a dict DeepSpeed caches in its module and reads in `build_shm_op`) marks it
    incompatible, so the backend falls back to plain torch.distributed. The previous entry is restored on exit."""
    import deepspeed.ops

    ops = deepspeed.ops.__compatible_ops__
    name = "deepspeed_shm_comm"
    old = ops.get(name, False)
    ops[name] = False
    try:
        yield
    finally:
        ops[name] = old


@contextlib.contextmanager
def hf_deepspeed_config_suspended():
    """Inside the block transformers sees no live `HfDeepSpeedConfig` (`is_deepspeed_zero3_enabled()` is False);
    the previous one is restored on exit, also on an exception."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


# --------------------------------------------------------------------------------------------------- peft


def lora_layers(model) -> list:
    """Every peft tuner layer (`BaseTunerLayer`) among `model.modules()`, in module order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def set_lora_active(layer, names: list[str]) -> None:
    """Make adapters `names` the active ones of one tuner layer, leaving every adapter's requires_grad as it is."""
    layer._active_adapter = list(names)


def set_lora_disabled(layer, disabled: bool) -> None:
    """Switch all adapters of one tuner layer off (the base layer alone) or back on, requires_grad untouched."""
    layer._disable_adapters = bool(disabled)


# ------------------------------------------------------------------------------------------------ datasets


def dataset_fingerprint(ds) -> str:
    """The fingerprint `datasets` computed for a loaded dataset (changes when its source or processing does)."""
    return ds._fingerprint
