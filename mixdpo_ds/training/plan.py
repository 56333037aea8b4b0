"""`mixdpo plan`: the bytes one rank holds for a run config, before the run (docs/scaling.md).

    plan = plan_memory(cfg, world_size=8)              # shapes from AutoConfig.from_pretrained(model.name_or_path)
    plan = plan_memory(cfg, 64, model_config="llama-3-70b")
    print(format_plan(plan))

Rows (bytes per rank; N = all policy parameters, n = the trainable ones, W = world size, P = bytes of
model.dtype; docs/scaling.md has the derivation of each):

    parameters        P·N (ZeRO-3: P·N/W), plus the frozen base head kept as the heads' reference (a buffer)
    gradients         P·n (ZeRO-2/3: P·n/W), plus the fp32 copies DeepSpeed makes
    master weights    fp32 copies of the trainable parameters that DeepSpeed keeps
    optimizer states  AdamW: exp_avg + exp_avg_sq, 8·n (ZeRO ≥ 1: 8·n/W)
    reference         a frozen copy of the base (replicated or sharded), or 0 when the policy is its own reference
                      or the reference log-probs are precomputed
    activations       saved tensors of the transformers that train, per micro batch (2·micro_batch rows × max_length)
    logits            the expert log-prob kernel's working memory (chunked: tiles; naive: (N_tok, K, V) in fp32)
    DeepSpeed working set   ZeRO-0's flat all-reduce copy of the gradients, the reduce bucket, a full gradient
                      before ZeRO-2/3 reduce it, ZeRO-3's gathered copies on W > 1 ranks
    runtime           the process baseline: Python + torch + transformers + DeepSpeed imported (measured on CPU)

The layer-activation constants assume SDPA attention (no (T, T) score matrix kept) and no dropout
(experts.disable_dropout); they are upper bounds on the tokens (every row padded to data.max_length).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mixdpo_ds.kernels.chunked import tile_shape
from mixdpo_ds.training.model_shapes import Shape, preset_config

log = logging.getLogger("mixdpo_ds")

GiB = 1 << 30
MiB = 1 << 20
# RSS of a CPU process that imported torch, transformers and deepspeed (benchmarks/bench_plan.py measures it)
RUNTIME_OVERHEAD_BYTES = 750 * MiB
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# ----------------------------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    rows: list[tuple[str, int, str]] = field(default_factory=list)     # (name, bytes per rank, what it counts)
    notes: list[str] = field(default_factory=list)
    header: str = ""

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.rows)

    def bytes_of(self, name: str) -> int:
        return sum(b for n, b, _ in self.rows if n == name)


@dataclass(frozen=True)
class _Tensors:
    """Element counts of one rank's policy (before ZeRO partitioning)."""
    trainable: int
    frozen: int
    buffer: int             # never partitioned (the heads' frozen base head)
    largest_trainable: int  # one tensor: its full gradient exists before ZeRO reduces it
    gathered: int           # held whole through the forward and backward under ZeRO-3 (the root's K heads)
    what: str


def policy_tensors(shape: Shape, ex, ep_size: int = 1) -> _Tensors:
    """The policy's parameters per kind (model/experts.py `build_policy`), ex: an ExpertsConfig."""
    V, H, K, trunk = shape.vocab, shape.hidden, ex.num_experts, shape.trunk_params()
    layer = shape.layer_params()
    if ex.kind == "models":
        n = K * shape.model_params()
        return _Tensors(n, 0, 0, V * H, 0, f"{K} models × {shape.model_params():,}")
    if ex.kind == "lora":
        n = K * shape.lora_params(ex.lora_r, ex.lora_target_modules)
        return _Tensors(n, shape.model_params(), 0, 0, 0, f"base {shape.model_params():,} + {K} adapters")
    frozen_trunk = ex.trunk == "frozen"
    buffer = V * H if frozen_trunk else 0                        # ref_head: the base head, the heads' reference
    if ex.head_rank is not None:
        r = ex.head_rank
        deltas = K * r * (V + H)
        base_head = V * H if not frozen_trunk and not shape.tied else 0
        trainable = deltas + base_head + (0 if frozen_trunk else trunk)
        return _Tensors(trainable, trunk if frozen_trunk else 0, buffer, max(K * V * r, base_head, layer),
                        K * V * r + K * r * H, f"trunk {trunk:,} + {K} rank-{r} deltas {deltas:,}")
    if K == 1 and not frozen_trunk and shape.tied and ex.init_noise == 0 and ep_size == 1:
        return _Tensors(trunk, 0, 0, V * H, 0, f"trunk {trunk:,} (tied head)")
    heads = K // ep_size * V * H
    trainable = heads + (0 if frozen_trunk else trunk)
    return _Tensors(trainable, trunk if frozen_trunk else 0, buffer, heads, heads,
                    f"trunk {trunk:,} + {K // ep_size} heads × {V * H:,}" + (f" (ep_size {ep_size})"
                                                                               if ep_size > 1 else ""))


def _optimizer_rows(t: _Tensors, stage: int, world: int, P: int, bf16: bool) -> list[tuple[str, int, str]]:
    """gradients / master weights / optimizer states (DeepSpeed 0.19: engine.py `_configure_optimizer`)."""
    n, W = t.trainable, world
    shard = W if stage >= 1 else 1
    if stage == 0:      # fp32: the torch AdamW as is; bf16: FP16_Optimizer, full fp32 master + fp32 grads
        grads, master = P * n + (4 * n if bf16 else 0), (4 * n if bf16 else 0)
    elif stage == 1:    # full grads (bf16: BF16_Optimizer's fp32 accumulation), an fp32 partition to step
        grads, master = P * n + (4 * n if bf16 else 4 * n // W), 4 * n // W
    elif stage == 2:    # partitioned grads + their fp32 flat copy at the step; the master partition is a clone
        grads, master = P * n // W + 4 * n // W, 4 * n // W
    else:               # an fp32 copy of the flat partition, in fp32 too (docs/scaling.md); bf16: fp32 grads too
        grads, master = P * n // W + (4 * n // W if bf16 else 0), 4 * n // W
    return [("gradients", grads, f"{n:,} trainable" + (f" / {W}" if stage >= 2 else "")),
            ("master weights", master, "fp32 copies kept by DeepSpeed"),
            ("optimizer states", 8 * n // shard, "AdamW exp_avg + exp_avg_sq, fp32" + (f" / {W}" if shard > 1 else ""))]


def _reference_row(cfg, shape: Shape, stage: int, world: int, P: int, sharded: bool,
                   builtin_under_zero3: bool) -> tuple[str, int, str]:
    """training/build.py `build_reference`: the policy is its own reference (frozen-trunk heads, lora) below ZeRO-3
    unless model.ref_name_or_path is set; otherwise a FrozenReference of the base (K of them for `models` with
    distinct init_paths), under ZeRO-3 partitioned over the ranks (`sharded`), else replicated."""
    ex = cfg.experts
    has_builtin = ex.kind == "lora" or (ex.kind == "heads" and ex.trunk == "frozen")
    if has_builtin and (stage < 3 or builtin_under_zero3) and not cfg.model.ref_name_or_path:
        return ("reference", 0, "the policy is its own reference")
    if cfg.train.reference == "precompute":
        return ("reference", 0, "precomputed log-probs (the model is dropped after set-up)")
    copies = len(set(ex.init_paths)) if ex.kind == "models" and ex.init_paths else 1
    n = copies * shape.model_params()
    split = world if sharded and stage == 3 else 1
    what = f"{copies} frozen cop{'y' if copies == 1 else 'ies'} of {shape.model_params():,}"
    return ("reference", P * n // split, what + (f" / {world} (sharded)" if split > 1 else " (replicated)"))


def _activation_rows(cfg, shape: Shape, P: int) -> list[tuple[str, int, str]]:
    ex, rows, T = cfg.experts, 2 * cfg.train.micro_batch_size, cfg.data.max_length
    tokens, H, L = rows * T, shape.hidden, shape.layers
    per_layer = shape.layer_activation_elems() * tokens * P
    passes = ex.num_experts if ex.kind in ("models", "lora") else (1 if ex.trunk == "trainable" else 0)
    if passes == 0:     # a frozen trunk runs under no_grad: one layer's temporaries and its output hidden states
        acts, what = per_layer + tokens * H * P, "frozen trunk: one layer's temporaries + hidden (rows, T, H)"
    elif _checkpointing(cfg.train.gradient_checkpointing):
        acts = passes * (L * tokens * H * P + 3 * tokens * H * P) + per_layer
        what = f"{passes} pass(es) × {L} layer inputs (checkpointed) + one layer recomputed"
    else:
        acts = passes * (L * per_layer + 3 * tokens * H * P)
        what = f"{passes} pass(es) × {L} layers × {shape.layer_activation_elems()}·{rows}·{T} elements"
    return [("activations", acts, what), ("logits", _logits_bytes(cfg, shape, rows * (T - 1), P),
                                          _logits_what(cfg, rows * (T - 1)))]


def _checkpointing(value) -> bool:
    """train.gradient_checkpointing resolved for a policy that trains a transformer: 'auto' / None -> on."""
    return value in ("auto", None) or value is True


def _logits_bytes(cfg, shape: Shape, n_tok: int, P: int) -> int:
    """kernels/chunked.py: one (chunk_n, chunk_v) fp32 tile + two temporaries + an fp32 (chunk_v, H) weight block,
    and the (N, H) response hidden states (a copy, its fp32 version, d_hidden); naive: (N, K, V) fp32 log-softmax
    kept, plus its gradient and the logits' gradient in the backward."""
    ex, V, H = cfg.experts, shape.vocab, shape.hidden
    hidden = n_tok * H * (P + 4 + 4)
    K = ex.num_experts // ex.ep_size if ex.kind == "heads" else 1
    if ex.kind == "heads" and ex.head_rank is not None:
        K += 1 if ex.trunk == "frozen" else 0                    # the base column, from the same pass
    if ex.logprob_impl == "naive":
        return 3 * n_tok * K * V * 4 + hidden
    chunk_n, chunk_v = tile_shape(n_tok, V, ex.chunk_size)
    return 3 * chunk_n * chunk_v * 4 + chunk_v * H * 4 + hidden


def _logits_what(cfg, n_tok: int) -> str:
    impl = cfg.experts.logprob_impl
    return (f"naive: 3 × (N={n_tok:,}, K, V) fp32" if impl == "naive"
            else f"{impl}: tiles of ≤ {n_tok:,} response tokens")


ALLREDUCE_BUCKET = 500_000_000  # deepspeed engine.py MEMORY_OPT_ALLREDUCE_SIZE: ZeRO-0's gradient all-reduce


def _zero_int(zero: dict, key: str, default: float) -> int:
    """A ZeRO size from the engine JSON; DeepSpeed's default where it is absent or "auto" (an HF Trainer-style
    config, whose "auto" transformers fills in from the model)."""
    value = zero.get(key, default)
    return int(value if isinstance(value, (int, float)) else default)


def _zero_rows(t: _Tensors, ds: dict, stage: int, world: int, P: int, shape: Shape) -> list[tuple[str, int, str]]:
    """DeepSpeed's transient buffers. ZeRO-0: the all-reduce flattens the gradients into buckets of 5e8 elements
    (a copy, also on one rank). ZeRO-1/2/3: the reduce bucket; ZeRO-2/3: the full gradient of the largest trainable
    tensor before it is reduced; ZeRO-3 on W > 1 ranks: the gathered parameters, each a fresh full copy (on one rank
    a partition is the tensor itself): the root's K heads (whole through the forward and backward), the embedding
    (V, H) (gathered alone), up to `stage3_max_live_parameters` and the prefetch bucket, at most all of them."""
    if stage == 0:
        flat = min(t.trainable, ALLREDUCE_BUCKET + t.largest_trainable) * P
        return [("DeepSpeed working set", flat, "the gradient all-reduce's flat copy")]
    zero = ds.get("zero_optimization") or {}
    bucket = min(_zero_int(zero, "reduce_bucket_size", 5e8), t.trainable) * P
    if stage == 1:
        return [("DeepSpeed working set", bucket, "reduce bucket")]
    full_grad = t.largest_trainable * P
    if stage == 2:
        return [("DeepSpeed working set", bucket + full_grad, "reduce bucket + one tensor's full gradient")]
    if world == 1:
        return [("DeepSpeed working set", bucket + full_grad, "reduce bucket + one full gradient (1 rank: nothing "
                                                              "to gather)")]
    live = _zero_int(zero, "stage3_max_live_parameters", 1e9) + _zero_int(zero, "stage3_prefetch_bucket_size", 5e7)
    gathered = min(t.gathered + shape.vocab * shape.hidden + live, t.trainable + t.frozen) * P
    return [("DeepSpeed working set", bucket + full_grad + gathered,
             "reduce bucket + one full gradient + gathered copies (heads, embedding, live + prefetched layers)")]


def plan_memory(cfg, world_size: int = 1, model_config=None, *, sharded_reference: bool = True,
                builtin_reference_zero3: bool = True, runtime_bytes: int = RUNTIME_OVERHEAD_BYTES) -> MemoryPlan:
    """Bytes per rank of a RunConfig on `world_size` ranks.

    model_config: a transformers config, a preset name (PRESETS) or None (AutoConfig of model.name_or_path).
    sharded_reference: under ZeRO-3 a separate frozen reference is a partitioned, optimizer-less engine (what
    training/build.py `build_reference` builds; False: a replicated copy, for comparison).
    builtin_reference_zero3: frozen-trunk heads / lora are their own reference under ZeRO-3 too, through the
    policy's engine (what build_reference does; False: a separate reference there, for comparison).
    """
    from mixdpo_ds.training.deepspeed_config import build_deepspeed_config, zero_stage_of

    if isinstance(model_config, str):
        model_config = preset_config(model_config)
    if model_config is None:
        from transformers import AutoConfig
        model_config = AutoConfig.from_pretrained(cfg.model.name_or_path)
    shape, t_cfg, ex = Shape.of(model_config), cfg.train, cfg.experts
    ds = build_deepspeed_config(cfg.deepspeed.config, t_cfg.micro_batch_size, t_cfg.grad_accum, world_size,
                                cfg.model.dtype, cfg.deepspeed.zero_stage, 1.0)
    stage, P, bf16, W = zero_stage_of(ds), DTYPE_BYTES[cfg.model.dtype], cfg.model.dtype == "bf16", world_size
    t = policy_tensors(shape, ex, ex.ep_size)
    split = W if stage == 3 else 1
    plan = MemoryPlan(header=f"{shape.model_type} V={shape.vocab} H={shape.hidden} L={shape.layers}, {ex.kind} "
                             f"K={ex.num_experts}, ZeRO-{stage}, {W} rank(s), {cfg.model.dtype}, micro batch "
                             f"{t_cfg.micro_batch_size} × {cfg.data.max_length} tokens")
    plan.rows.append(("parameters", P * (t.trainable + t.frozen) // split + P * t.buffer,
                      t.what + (f" / {W}" if split > 1 else "") + (" + base head buffer" if t.buffer else "")))
    plan.rows += _optimizer_rows(t, stage, W, P, bf16)
    plan.rows.append(_reference_row(cfg, shape, stage, W, P, sharded_reference, builtin_reference_zero3))
    plan.rows += _activation_rows(cfg, shape, P)
    plan.rows += _zero_rows(t, ds, stage, W, P, shape)
    plan.rows.append(("runtime", runtime_bytes, "Python + torch + transformers + DeepSpeed (CPU baseline)"))
    return plan


def _human(n: int) -> str:
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / MiB:,.1f} MiB"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as an aligned text table, one row per component and the total."""
    rows = [(name, _human(b), what) for name, b, what in plan.rows] + [("total", _human(plan.total), "per rank")]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [plan.header, f"{'component':<{w0}}  {'bytes/rank':>{w1}}  counts"]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines + plan.notes)


def log_plan(cfg, world_size: int) -> MemoryPlan | None:
    """Log the plan's table at the start of a run (INFO); a model the plan cannot count gets a warning, not an
    error (the run itself does not depend on the estimate)."""
    try:
        plan = plan_memory(cfg, world_size)
    except (ValueError, OSError) as e:
        log.warning("memory plan unavailable: %s", e)
        return None
    log.info("memory plan (docs/scaling.md):\n%s", format_plan(plan))
    return plan


GRID_OVERRIDES = ["model.dtype=bf16", "train.micro_batch_size=1", "data.max_length=1024", "data.max_prompt_length=512",
                  "train.gradient_checkpointing=true", "experts.logprob_impl=chunked", "experts.lora_r=16",
                  "experts.lora_target_modules=[q_proj, k_proj, v_proj, o_proj]"]


def grid_markdown(models=("llama-3-8b", "llama-3-70b"), experts=(2, 4, 8), kinds=("heads", "lora"), stages=(2, 3),
                  worlds=(8, 64)) -> str:
    """The docs/scaling.md table (`mixdpo plan --grid`): GiB per rank over the grid, with the ZeRO-3 reference as
    set-up builds it (the policy's own, or a partitioned engine) and, for comparison, a replicated copy."""
    from mixdpo_ds.training.config import load_config

    head = ["model", "experts", "K", "ZeRO", "GPUs", "params", "grads + master + Adam",
            "reference (as built / a replicated copy)", "activations + logits", "DeepSpeed working set",
            "total (as built / with a replicated reference)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in models:
        config = preset_config(name)
        for kind in kinds:
            for K in experts:
                for stage in stages:
                    for W in worlds:
                        cfg = load_config(None, [*GRID_OVERRIDES, f"model.name_or_path={name}",
                                                 f"experts.kind={kind}", f"experts.num_experts={K}",
                                                 f"deepspeed.config=zero{stage}"])
                        lines.append(_grid_line(name, kind, K, stage, W, plan_memory(cfg, W, config),
                                                plan_memory(cfg, W, config, sharded_reference=False,
                                                            builtin_reference_zero3=False)))
    return "\n".join(lines)


def _grid_line(name, kind, K, stage, W, plan: MemoryPlan, repl: MemoryPlan) -> str:
    g = lambda *names: sum(plan.bytes_of(n) for n in names) / GiB  # noqa: E731
    ref = f"{g('reference'):.1f} / {repl.bytes_of('reference') / GiB:.1f}"
    cells = [name, kind, K, stage, W, f"{g('parameters'):.1f}",
             f"{g('gradients', 'master weights', 'optimizer states'):.1f}", ref, f"{g('activations', 'logits'):.1f}",
             f"{g('DeepSpeed working set'):.1f}", f"{plan.total / GiB:.1f} / {repl.total / GiB:.1f}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"
