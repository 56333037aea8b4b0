"""Builders of the trainer's set-up: config -> engine, reference log-probs, a pre-trained gate.

Each takes plain arguments and returns plain objects; `MixDPOTrainer.setup` calls them in order.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch

from mixdpo_ds.compat import set_lora_active
from mixdpo_ds.model.reference import PolicyReference
from mixdpo_ds.training.batch import chosen_prompt_features, model_inputs
from mixdpo_ds.training.deepspeed_config import zero_stage_of
from mixdpo_ds.training.distributed import replicated_load
from mixdpo_ds.training.schedule import build_scheduler

log = logging.getLogger("mixdpo_ds")


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next `step()` can be skipped outright (no parameter or moment changes): how a step with a
    non-finite loss or gradient is dropped under `train.nonfinite=skip` (training/guard.py).

    The fused implementation (one vectorised kernel per parameter, on the CPU too) unless the caller chooses:
    torch's default on the CPU is the per-tensor Python loop (foreach needs every parameter on CUDA), which for a
    GPT-2's ~150 tensors costs more than the update's arithmetic.
    """

    skip_next = False

    def __init__(self, params, **kwargs):
        params = list(params)
        if "fused" not in kwargs and "foreach" not in kwargs and fused_adamw_supported(params):
            kwargs["fused"] = True
        super().__init__(params, **kwargs)

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def fused_adamw_supported(params) -> bool:
    """True when torch's fused AdamW takes every parameter (floating point, on the CPU or CUDA)."""
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(tensors) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)


def skippable_adamw(optimizer) -> SkippableAdamW:
    """Our AdamW inside whatever DeepSpeed wrapped it in (ZeRO-0 fp32 returns it as is; bf16 wraps it)."""
    while not isinstance(optimizer, SkippableAdamW):
        optimizer = optimizer.optimizer
    return optimizer


def load_checked_data(cfg, tokenizer):
    """The preference data, after the checks that need no engine: data.max_length against every model's positions
    (before tokenising), and a user gate against the data's user column."""
    from transformers import AutoConfig

    from mixdpo_ds.training.data import check_lengths, check_user_gate, load_preference_data

    paths = reference_paths(cfg)  # the base, or the K initial checkpoints of `models` experts
    for path in [paths] if isinstance(paths, str) else paths:
        check_lengths(AutoConfig.from_pretrained(path), cfg.data)
    data = load_preference_data(cfg.data, tokenizer)
    check_user_gate(cfg.gate, data)
    return data


def build_engine(policy, cfg, ds_config: dict, total_steps: int):
    """The seam for parallelism: policy + run config -> (engine, optimizer, lr_scheduler).

    One AdamW with the policy's param groups (trunk / each expert at its own lr); for `experts.ep_size > 1` the
    heads go in DeepSpeed's expert-parallel ('moe') groups (model/parallel.py)."""
    import deepspeed

    t = cfg.train
    if checkpointing_wanted(t.gradient_checkpointing, cfg.experts):
        enable_gradient_checkpointing(policy)
    groups = policy.param_groups(t.lr, t.weight_decay)
    if cfg.experts.ep_size > 1:
        from mixdpo_ds.model.parallel import check_expert_parallel, moe_param_groups

        check_expert_parallel(cfg.experts.num_experts, cfg.experts.ep_size, zero_stage_of(ds_config),
                              torch.distributed.get_world_size())
        groups = moe_param_groups(groups)
    optimizer = SkippableAdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_epsilon,
                               weight_decay=t.weight_decay)
    scheduler = build_scheduler(optimizer, t, total_steps)  # transformers.get_scheduler (training/schedule.py)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
    return engine, optimizer, scheduler


def checkpointing_wanted(value, experts) -> bool:
    """train.gradient_checkpointing resolved: 'auto' / None -> on unless frozen-trunk heads (whose trunk runs under
    no_grad: nothing to recompute); true / false as given."""
    if value is None or value == "auto":
        return not (experts.kind == "heads" and experts.trunk == "frozen")
    return bool(value)


def checkpointing_kwargs(policy) -> dict:
    """torch.utils.checkpoint's arguments: non-reentrant (transformers' and torch's default; DeepSpeed 0.19.8 keeps
    frozen ZeRO-3 weights gathered through a non-reentrant recompute, so lora under ZeRO-3 needs no reentrant
    workaround). lora adds a `context_fn`: the K experts share one base and the forward switches adapters between
    their passes, so the backward's recompute of a layer, which runs after all K passes, must switch back to the
    adapter that layer's forward had, else every pass is recomputed with the last expert's adapter (wrong
    gradients, caught by tests/unit/test_gradient_checkpointing.py)."""
    if policy.kind != "lora":
        return {"use_reentrant": False}
    layers = policy._lora_layers

    def context_fn():
        active = list(layers[0].active_adapters)   # one adapter set is active on every layer (`MixturePolicy._select`)
        return contextlib.nullcontext(), _adapters_active(layers, active)
    return {"use_reentrant": False, "context_fn": context_fn}


@contextlib.contextmanager
def _adapters_active(layers: list, names: list[str]):
    before = list(layers[0].active_adapters)
    for layer in layers:
        set_lora_active(layer, names)
    try:
        yield
    finally:
        for layer in layers:
            set_lora_active(layer, before)


def enable_gradient_checkpointing(policy) -> list:
    """transformers' activation checkpointing on every transformer the policy trains: a trainable trunk, the K
    models, the base under lora (its frozen weights still carry the adapters' activations). A frozen trunk runs
    under no_grad and has nothing to recompute. The trunk runs without KV cache (model/hf_lm.py); transformers
    makes the embedding outputs require grad (`enable_input_require_grads`, what PEFT needs). -> the models it was
    enabled on."""
    if policy.kind == "heads":
        models = [policy.trunk] if policy.cfg.trunk == "trainable" else []
    elif policy.kind == "models":
        models = list(policy.models)
    else:
        models = [policy.lora_model.base_model.model]
    kwargs = checkpointing_kwargs(policy)
    for model in models:
        if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not models:
        log.warning("train.gradient_checkpointing: experts.kind='heads' with a frozen trunk trains no transformer "
                    "layer; nothing to checkpoint")
    return models


def reference_paths(cfg):
    """The reference model(s): model.ref_name_or_path when set, the K initial checkpoints of `models` experts, else
    the base model."""
    if cfg.model.ref_name_or_path:
        return cfg.model.ref_name_or_path
    if cfg.experts.kind == "models" and cfg.experts.init_paths:
        return cfg.experts.init_paths
    return cfg.model.name_or_path


def reference_ds_config(ds_config: dict) -> dict:
    """The engine config of a separate reference under ZeRO-3: the policy's (same zero_optimization, stage 3, same
    batch keys) without optimizer or scheduler, as TRL's `_prepare_deepspeed` builds it."""
    config = {k: v for k, v in copy.deepcopy(ds_config).items() if k not in ("optimizer", "scheduler")}
    if zero_stage_of(config) != 3:
        raise ValueError(f"a sharded reference engine needs zero_optimization.stage 3, got {zero_stage_of(config)}")
    return config


def make_reference(cfg, engine, zero_stage: int, dtype, ds_config: dict):
    """The object whose .logps(batch) gives π_ref: see `build_reference`."""
    import deepspeed
    from transformers.integrations import is_deepspeed_zero3_enabled

    from mixdpo_ds.model.reference import EngineReference, FrozenReference

    policy, paths = engine.module, reference_paths(cfg)
    if policy.has_builtin_reference and not cfg.model.ref_name_or_path:
        return EngineReference(engine, builtin=True) if zero_stage == 3 else PolicyReference(policy)
    if zero_stage < 3:
        with replicated_load():
            reference = FrozenReference(paths, dtype, cfg.experts.logprob_impl, cfg.experts.chunk_size)
        return reference.to(engine.device)
    if not is_deepspeed_zero3_enabled():  # from_pretrained would load the full model on every rank
        raise RuntimeError("a ZeRO-3 reference must be built while the run's HfDeepSpeedConfig is alive "
                           "(docs/deepspeed.md §4)")
    reference = FrozenReference(paths, dtype, cfg.experts.logprob_impl, cfg.experts.chunk_size)  # partitioned
    ref_engine, *_ = deepspeed.initialize(model=reference, config=reference_ds_config(ds_config))
    ref_engine.eval()
    return EngineReference(ref_engine, builtin=False)


def build_reference(cfg, engine, data, zero_stage: int, rank: int, world: int, collate, out_dir, dtype,
                    ds_config: dict):
    """-> (reference, ref_tables): an object with .logps(batch), or None with precomputed tables {split: (n, 2)}.

    Built after the engine (docs/deepspeed.md §7). The policy's own reference when it has one (frozen-trunk heads:
    trunk + base head; lora: adapters disabled) and model.ref_name_or_path is unset: below ZeRO-3 called directly
    (`PolicyReference`), under ZeRO-3 through the engine's forward (`EngineReference(builtin=True)`), whose hooks
    gather the partitioned weights; no second copy either way. Otherwise a `FrozenReference` of the reference
    path(s): replicated below ZeRO-3; under ZeRO-3 loaded partitioned (the run's HfDeepSpeedConfig is alive) into
    an optimizer-less engine with the same stage-3 settings, as TRL and OpenRLHF do, so no rank ever holds it whole.

    train.reference=precompute: below ZeRO-3 rank 0 computes and writes the cache, the others read it; under
    ZeRO-3 all ranks compute together, each its share of the examples, and the tables are all-reduced
    (`precompute_reference_logps_sharded`). The reference is then dropped (a separate one frees its memory).
    """
    from mixdpo_ds.model.reference import (
        precompute_reference_logps,
        precompute_reference_logps_sharded,
        reference_cache_key,
    )

    reference = make_reference(cfg, engine, zero_stage, dtype, ds_config)
    if cfg.train.reference == "model":
        return reference, None
    cache_dir = cfg.train.reference_cache_dir or str(out_dir / "ref_cache")
    tables = {}
    for split, examples in (("train", data.train), ("eval", data.eval)):
        if not examples:
            continue
        key = reference_cache_key(reference_paths(cfg), data.fingerprint, cfg.data.max_length,
                                  cfg.data.max_prompt_length, {"dtype": cfg.model.dtype, "split": split})
        bs = cfg.train.micro_batch_size
        if zero_stage == 3:
            tables[split] = precompute_reference_logps_sharded(reference, examples, collate, bs, cache_dir, key,
                                                               rank, world, engine.device)
            continue
        torch.distributed.barrier()  # rank 0 computes and writes, then the others read its file
        for turn in (0, 1):
            if split not in tables and (rank == 0) == (turn == 0):
                tables[split] = precompute_reference_logps(reference, examples, collate, bs, cache_dir, key)
            torch.distributed.barrier()
    return None, tables


def pretrain_gate_on_labels(cfg, engine, gate, examples: list[dict], collate, K: int, device) -> float:
    """Supervised gate pre-training on the label column (`gate.pretrain_*`); returns its accuracy."""
    from mixdpo_ds.model.gating import pretrain_gate

    col = cfg.gate.pretrain_label_column
    if col != cfg.data.group_column:
        raise ValueError(f"gate.pretrain_label_column={col!r}: only the data.group_column "
                         f"({cfg.data.group_column!r}) is loaded; set them equal")
    examples = [ex for ex in examples if ex["group"] >= 0]
    feats, users = [], []
    with torch.no_grad():
        for i in range(0, len(examples), cfg.train.micro_batch_size):
            batch = collate(examples[i:i + cfg.train.micro_batch_size])
            out = engine(**model_inputs(batch, device))
            B = batch["index"].shape[0]
            feats.append(chosen_prompt_features(out, B))
            users.append(batch["user_ids"].to(device))
    features = torch.cat(feats) if feats and feats[0] is not None else None
    labels = torch.tensor([ex["group"] for ex in examples], device=device) % K
    acc = pretrain_gate(gate, features, labels, cfg.gate.pretrain_steps, cfg.gate.lr,
                        user_ids=torch.cat(users), seed=cfg.train.seed)
    log.info("gate pre-training on %r: accuracy %.3f", col, acc)
    return acc


def warn_identical_experts(cfg, K: int) -> None:
    """Warn when K > 1 experts start identical and nothing will ever break their symmetry (docs/math.md §8)."""
    em, ex = cfg.em, cfg.experts
    distinct_init = ex.kind == "models" and ex.init_paths and len(set(ex.init_paths)) > 1
    if K > 1 and ex.init_noise == 0 and em.warmup_random_steps == 0 and not distinct_init \
            and em.mode == "exact" and ex.kind != "lora":
        log.warning("K=%d identical experts with experts.init_noise=0 and em.warmup_random_steps=0: under a "
                    "uniform gate they get identical updates forever (symmetry never breaks). Set "
                    "experts.init_noise > 0 and/or em.warmup_random_steps > 0.", K)
