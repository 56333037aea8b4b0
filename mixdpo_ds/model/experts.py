"""K expert policies with one forward that returns their sequence log-probs (SPEC §2, paper App. B).

Three kinds behind one `MixturePolicy.forward(input_ids, attention_mask, labels, prompt_last_index)`:

- `heads`  (Case 1, B.1): one shared trunk (the base model's decoder) and K LM heads held as one
  (K, V, H) parameter, each a copy of the base output embedding (untied from GPT-2's `wte`) plus noise.
- `models` (Case 2, B.2): K full Hugging Face causal LMs (the base, or `init_paths[k]`).
- `lora`   (B.3 hybrid, beyond the paper): K `peft` LoRA adapters on one frozen base.

Every kind ends in `sequence_logps`, which runs the kernel `expert_logprobs` on response tokens only:
lp_k(row) = Σ_{t: labels[t+1] != -100} log softmax(heads_k · h_t)[labels[t+1]]   (SPEC §1 `policy_logps`).

Batch layout (docs/ARCHITECTURE.md): rows 0..B-1 chosen, B..2B-1 rejected, right padding; labels are
-100 on prompt and padding, so padded positions never enter a sum (causal attention keeps real tokens
blind to padding on their right).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM, PreTrainedModel

from mixdpo_ds.compat import lora_layers, set_lora_active, set_lora_disabled
from mixdpo_ds.model.hf_lm import (
    disable_dropout,
    gathered,
    head_weight,
    partitioned,
    register_heads_for_zero3,
    sequence_logps,
    trunk_hidden,
)

KINDS = ("heads", "models", "lora")
TRUNK_MODES = ("frozen", "trainable")
LOGPROB_IMPLS = ("auto", "naive", "chunked", "triton")
DEFAULT_INIT_NOISE = 0.05


@dataclass
class ExpertsConfig:
    kind: str = field(default="heads", metadata={"help": "heads (Case 1) | models (Case 2) | lora (K adapters)"})
    num_experts: int = field(default=3, metadata={"help": "K, the number of experts"})
    init_noise: float | None = field(default=None, metadata={
        "help": "None: 0.05 when num_experts > 1 (symmetry must be broken: SPEC §1), else 0. Otherwise the std "
                "of the Gaussian noise added to each expert copy, relative to the std of the weight it is added "
                "to: heads: the base head; models: every weight matrix (ndim >= 2); lora: each lora_B gets noise "
                "relative to its base layer's weight std. 0 keeps the copies identical (symmetry: SPEC §1)"})
    trunk: str = field(default="frozen", metadata={
        "help": "heads only: frozen (no grad, eval mode, run under no_grad; low-capacity experts specialise) | "
                "trainable"})
    init_paths: list[str] | None = field(default=None, metadata={
        "help": "models only: K initial checkpoints (default: every expert starts from the base)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "peft target modules (None: peft's default for the architecture; the LM head may not be one)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lr_trunk: float | None = field(default=None, metadata={"help": "trunk learning rate (heads, trainable trunk); "
                                                                   "None: the optimizer lr"})
    lr_experts: list[float] | float | None = field(default=None, metadata={
        "help": "per-expert learning rate (one value or K values; heads: all K equal, they are one parameter)"})
    logprob_impl: str = field(default="auto", metadata={
        "help": "expert_logprobs implementation: auto (triton on CUDA, chunked otherwise) | naive | chunked | triton"})
    chunk_size: int | None = field(default=None, metadata={"help": "vocabulary chunk of the chunked kernel"})
    ep_size: int = field(default=1, metadata={"help": "expert-parallel group size (model/parallel.py); 1 = dense"})
    disable_dropout: bool = field(default=True, metadata={
        "help": "set every dropout p to 0 in the experts (as TRL does for DPO: policy and reference log-probs "
                "must be comparable)"})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"experts.kind={self.kind!r}: allowed {KINDS}")
        if self.num_experts < 1:
            raise ValueError(f"experts.num_experts={self.num_experts}: must be >= 1")
        if self.init_noise is None:
            self.init_noise = DEFAULT_INIT_NOISE if self.num_experts > 1 else 0.0
        if self.init_noise < 0:
            raise ValueError(f"experts.init_noise={self.init_noise}: must be >= 0")
        if self.trunk not in TRUNK_MODES:
            raise ValueError(f"experts.trunk={self.trunk!r}: allowed {TRUNK_MODES}")
        if self.logprob_impl not in LOGPROB_IMPLS:
            raise ValueError(f"experts.logprob_impl={self.logprob_impl!r}: allowed {LOGPROB_IMPLS}")
        if self.init_paths is not None:
            if self.kind != "models":
                raise ValueError(f"experts.init_paths is for experts.kind='models', not {self.kind!r}")
            if len(self.init_paths) != self.num_experts:
                raise ValueError(f"experts.init_paths has {len(self.init_paths)} paths; experts.num_experts="
                                 f"{self.num_experts}")
        if isinstance(self.lr_experts, (list, tuple)):
            if len(self.lr_experts) != self.num_experts:
                raise ValueError(f"experts.lr_experts has {len(self.lr_experts)} values; need one or "
                                 f"experts.num_experts={self.num_experts}")
            if self.kind == "heads" and len(set(self.lr_experts)) > 1:
                raise ValueError("experts.lr_experts: kind 'heads' keeps the K heads in one (K, V, H) parameter "
                                 "(one fused kernel call), so the K values must be equal")
        if self.lora_r < 1:
            raise ValueError(f"experts.lora_r={self.lora_r}: must be >= 1")
        if self.lora_target_modules and any("lm_head" in m for m in self.lora_target_modules):
            raise ValueError("experts.lora_target_modules: the LM head may not be a LoRA target (the head is read "
                             "as a plain weight by the log-prob kernel)")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ValueError(f"experts.ep_size={self.ep_size}: must be >= 1 and divide experts.num_experts="
                             f"{self.num_experts}")
        if self.ep_size > 1 and self.kind != "heads":
            raise ValueError(f"experts.ep_size={self.ep_size} is implemented for experts.kind='heads' only, "
                             f"got {self.kind!r}; use experts.ep_size=1")

    def expert_lr(self, k: int, lr: float) -> float:
        if self.lr_experts is None:
            return lr
        if isinstance(self.lr_experts, (list, tuple)):
            return float(self.lr_experts[k])
        return float(self.lr_experts)


class PolicyOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 hooks the tensors of tuple/dict outputs only, and without its
    backward hook the heads are not re-gathered for the backward (empty saved tensors)."""
    logps: torch.Tensor                    # (2B, K) fp32 sums over response tokens
    prompt_features: torch.Tensor | None   # (2B, H) detached hidden state at the last prompt token
    ref_logps: torch.Tensor | None = None  # (2B,) π_ref log-probs from the same trunk pass (frozen-trunk heads)


def _add_noise_(tensor: torch.Tensor, rel_std: float, generator: torch.Generator, ref: torch.Tensor = None) -> None:
    """tensor += N(0, (rel_std · std(ref))²) in place; ref defaults to the tensor itself."""
    ref = tensor if ref is None else ref
    scale = rel_std * ref.detach().float().std()
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * scale
    with torch.no_grad():
        tensor.add_(noise.to(tensor.dtype).to(tensor.device))


def _prompt_features(hidden: torch.Tensor, prompt_last_index: torch.Tensor | None) -> torch.Tensor | None:
    if prompt_last_index is None:
        return None
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, prompt_last_index.to(hidden.device)].detach()                  # (2B, H)


def _split_decay(params: list[tuple[str, nn.Parameter]], name: str, lr: float, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (biases, norms: none), the usual transformer recipe."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay},
              {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class MixturePolicy(nn.Module):
    """K expert policies; `forward` gives their (2B, K) sequence log-probs. Build with `build_policy`.

    Exactly one of (trunk + heads), models, lora_model is given, matching cfg.kind.
    `ref_head` (V, H): the base head for the built-in reference of a frozen-trunk `heads` policy.
    """

    def __init__(self, cfg: ExpertsConfig, config, *, trunk: nn.Module | None = None,
                 heads: torch.Tensor | None = None, models: list[PreTrainedModel] | None = None,
                 lora_model: nn.Module | None = None, ref_head: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.config = config
        self.kind = cfg.kind
        self.num_experts = cfg.num_experts
        self.trunk = trunk
        self.heads = nn.Parameter(heads) if heads is not None and cfg.ep_size == 1 else None    # (K, V, H)
        self.ep_heads = None    # experts.ep_size > 1: this rank's K/ep_size heads (mixdpo_ds.model.parallel)
        if heads is not None and cfg.ep_size > 1:
            from mixdpo_ds.model.parallel import build_expert_parallel_heads
            self.ep_heads = build_expert_parallel_heads(heads, cfg)
        self.models = nn.ModuleList(models) if models is not None else None
        self.lora_model = lora_model
        self.adapter_names = [f"expert_{k}" for k in range(cfg.num_experts)]
        if ref_head is not None:
            self.register_buffer("ref_head", ref_head.detach().clone(), persistent=False)
        else:
            self.ref_head = None
        if self.kind == "heads" and cfg.trunk == "frozen":
            self.trunk.requires_grad_(False)
            self.trunk.eval()
        if self.kind == "models":
            register_heads_for_zero3(self, [head_weight(m) for m in self.models])
        elif self.kind == "lora":
            register_heads_for_zero3(self, [head_weight(lora_model.base_model.model)])
            # a plain list, not a ModuleList: the layers are already submodules of lora_model
            self._lora_layers = lora_layers(lora_model)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.kind == "heads" and self.cfg.trunk == "frozen":
            self.trunk.eval()     # a frozen trunk is the reference's trunk: no dropout, ever
        return self

    @property
    def has_builtin_reference(self) -> bool:
        """True when `reference_logps` gives π_ref without a second model (frozen-trunk heads, lora)."""
        return self.kind == "lora" or (self.kind == "heads" and self.ref_head is not None)

    def _logps(self, hidden, heads, labels):
        return sequence_logps(hidden, heads, labels, self.cfg.logprob_impl, self.cfg.chunk_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                prompt_last_index: torch.Tensor | None = None) -> PolicyOutput:
        """(2B, T) ids, mask, labels (-100 off the response) -> PolicyOutput(logps (2B, K) fp32, ...)."""
        if self.kind == "heads":
            if self.cfg.trunk == "frozen":
                with torch.no_grad():
                    hidden = trunk_hidden(self.trunk, input_ids, attention_mask)
            else:
                hidden = trunk_hidden(self.trunk, input_ids, attention_mask)
            if self.ep_heads is not None:
                from mixdpo_ds.model.parallel import ep_sequence_logps
                logps = ep_sequence_logps(self.ep_heads, hidden, labels)                 # (2B, K)
            else:
                logps = self._logps(hidden, self.heads, labels)                          # (2B, K)
            ref_logps = None
            if self.cfg.trunk == "frozen" and self.ref_head is not None:
                # the reference is the base head on the same frozen hidden states: no second trunk pass
                with torch.no_grad():
                    ref_logps = self._logps(hidden, self.ref_head.unsqueeze(0), labels)[:, 0]   # (2B,)
            return PolicyOutput(logps, _prompt_features(hidden, prompt_last_index), ref_logps)
        per_expert, features = [], None
        for k in range(self.num_experts):
            model = self._select(k)
            hidden = trunk_hidden(model.base_model, input_ids, attention_mask)
            per_expert.append(self._logps(hidden, head_weight(model).unsqueeze(0), labels))   # (2B, 1)
            if k == 0:      # `models`: the gate reads expert 0's trunk (documented in ARCHITECTURE.md)
                features = _prompt_features(hidden, prompt_last_index)
        return PolicyOutput(torch.cat(per_expert, dim=1), features)

    def _select(self, k: int) -> PreTrainedModel:
        """The HF causal LM that computes expert k (for lora: the shared base with adapter k active)."""
        if self.kind == "models":
            return self.models[k]
        # Activate adapter k on every LoRA layer without peft's `set_adapter`, which also flips requires_grad of the
        # inactive adapters (ZeRO-1/2's gradient hooks need requires_grad fixed from the forward to the backward).
        # All K adapters stay trainable; only the active one is in this pass's graph.
        for module in self._lora_layers:
            set_lora_active(module, [self.adapter_names[k]])
        return self.lora_model.base_model.model

    @torch.no_grad()
    def reference_logps(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """π_ref sequence log-probs (2B,) without a second model: the frozen trunk with the base head (heads),
        or the base with adapters disabled (lora)."""
        if self.kind == "heads" and self.ref_head is not None:
            hidden = trunk_hidden(self.trunk, input_ids, attention_mask)
            return self._logps(hidden, self.ref_head.unsqueeze(0), labels)[:, 0]
        if self.kind == "lora":
            was_training = self.lora_model.training
            self.lora_model.eval()
            # Adapters off by the layers' own flag, not peft's `disable_adapter()`: re-enabling through peft marks
            # the inactive adapters requires_grad=False, and that between the policy forward and its backward
            # leaves ZeRO-1/2's gradient hooks with param.grad None (a crash at the first step).
            for module in self._lora_layers:
                set_lora_disabled(module, True)
            try:
                model = self.lora_model.base_model.model
                hidden = trunk_hidden(model.base_model, input_ids, attention_mask)
                out = self._logps(hidden, head_weight(model).unsqueeze(0), labels)[:, 0]
            finally:
                for module in self._lora_layers:
                    set_lora_disabled(module, False)
                self.lora_model.train(was_training)
            return out
        raise ValueError(f"experts.kind={self.kind!r} (trunk={self.cfg.trunk!r}) has no built-in reference; "
                         "use reference.FrozenReference")

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups: trunk (lr_trunk) and each expert (lr_experts[k]); trainable params only, each once."""
        groups = []
        if self.kind == "heads":
            trunk = [(n, p) for n, p in self.trunk.named_parameters() if p.requires_grad]
            groups += _split_decay(trunk, "trunk", self.cfg.lr_trunk if self.cfg.lr_trunk is not None else lr,
                                   weight_decay)
            heads = [self.heads] if self.ep_heads is None else list(self.ep_heads.parameters())
            groups.append({"name": "experts", "params": heads, "lr": self.cfg.expert_lr(0, lr),
                           "weight_decay": weight_decay})
        elif self.kind == "models":
            for k, model in enumerate(self.models):
                params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                groups += _split_decay(params, f"expert_{k}", self.cfg.expert_lr(k, lr), weight_decay)
        else:
            for k, adapter in enumerate(self.adapter_names):
                params = [(n, p) for n, p in self.lora_model.named_parameters()
                          if p.requires_grad and f".{adapter}." in f"{n}."]
                groups += _split_decay(params, f"expert_{k}", self.cfg.expert_lr(k, lr), weight_decay)
        return groups

    @torch.no_grad()
    def expert_model(self, k: int) -> PreTrainedModel:
        """Expert k as a standalone CPU causal LM (heads: trunk + head k, untied; lora: adapter k merged).

        Built with the model class's constructor, not from_config: under a live HfDeepSpeedConfig (ZeRO-3)
        from_config would partition the copy. Under ZeRO-3 call it inside GatheredParameters (full weights).
        """
        if self.kind == "lora":
            peft_copy = copy.deepcopy(self.lora_model).cpu()
            peft_copy.base_model.set_adapter(self.adapter_names[k])
            return peft_copy.merge_and_unload(adapter_names=[self.adapter_names[k]]).cpu().eval()
        config = copy.deepcopy(self.config if self.kind == "heads" else self.models[k].config)
        if self.kind == "heads":
            config.tie_word_embeddings = False
        with torch.random.fork_rng(devices=[]):     # the throw-away init must not move the caller's RNG
            model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
        if self.kind == "heads":
            model.base_model.load_state_dict({n: t.cpu() for n, t in self.trunk.state_dict().items()})
            model.get_output_embeddings().weight.copy_(self.heads[k].detach().cpu())
            dtype = self.heads.dtype
        else:
            state = self.models[k].state_dict()
            model.load_state_dict({n: t.cpu() for n, t in state.items()})
            dtype = next(self.models[k].parameters()).dtype
        return model.to(dtype).eval()


def _build_lora(base: PreTrainedModel, cfg: ExpertsConfig, seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules,
                          lora_dropout=cfg.lora_dropout, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)     # peft draws lora_A from the global RNG
        model = get_peft_model(base, lora_cfg, adapter_name="expert_0")
        for k in range(1, cfg.num_experts):
            model.add_adapter(f"expert_{k}", lora_cfg)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def _lora_noise_(model: nn.Module, rel_std: float, generator: torch.Generator) -> None:
    """Noise on each lora_B, scaled by its base layer's weight std. Under ZeRO-3 the base weight is partitioned at
    load (empty here: its std would be NaN), so it is gathered to read it; the adapters are not partitioned yet and
    every rank draws the same noise (same generator seed)."""
    for module in model.modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict) and hasattr(module, "get_base_layer"):
            base_weight = module.get_base_layer().weight
            with gathered([base_weight]):
                for linear in lora_b.values():
                    _add_noise_(linear.weight, rel_std, generator, ref=base_weight)


def _noise_model_(model: nn.Module, rel_std: float, generator: torch.Generator) -> None:
    for p in model.parameters():
        with gathered([p], modify=True):
            if p.ndim >= 2:
                _add_noise_(p, rel_std, generator)


def build_policy(model_name_or_path: str, cfg: ExpertsConfig, torch_dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> MixturePolicy:
    """Load the base causal LM and make K experts of cfg.kind from it; noise drawn from a generator seeded `seed`
    (the same on every rank). Under ZeRO-3 (weights partitioned at load) the base head is gathered to copy it."""
    generator = torch.Generator().manual_seed(seed)

    def load(path: str) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        if cfg.disable_dropout:
            disable_dropout(model)
        return model

    base = load(cfg.init_paths[0] if cfg.kind == "models" and cfg.init_paths else model_name_or_path)
    if cfg.kind == "heads":
        weight = head_weight(base)
        with gathered([weight]):
            head = weight.detach().clone()                                                # (V, H)
        heads = head.unsqueeze(0).repeat(cfg.num_experts, 1, 1)                           # (K, V, H), untied
        for k in range(cfg.num_experts):
            if cfg.init_noise > 0:
                _add_noise_(heads[k], cfg.init_noise, generator, ref=head)
        ref_head = head if cfg.trunk == "frozen" else None
        return MixturePolicy(cfg, base.config, trunk=base.base_model, heads=heads, ref_head=ref_head)
    if cfg.kind == "models":
        models = [base]
        for k in range(1, cfg.num_experts):
            if cfg.init_paths is not None or partitioned(base.parameters()):   # no deepcopy of ZeRO-3 params
                models.append(load(cfg.init_paths[k] if cfg.init_paths else model_name_or_path))
            else:
                models.append(copy.deepcopy(base))
        if cfg.init_noise > 0:
            for model in models:
                _noise_model_(model, cfg.init_noise, generator)
        return MixturePolicy(cfg, base.config, models=models)
    lora_model = _build_lora(base, cfg, seed)
    if cfg.init_noise > 0:
        _lora_noise_(lora_model, cfg.init_noise, generator)
    return MixturePolicy(cfg, base.config, lora_model=lora_model)
