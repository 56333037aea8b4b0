"""K expert policies with one forward that returns their sequence log-probs (docs/math.md §1, paper App. B).

Three kinds behind one `MixturePolicy.forward(input_ids, attention_mask, labels, prompt_last_index)`:

- `heads`  (Case 1, B.1): one shared trunk (the base model's decoder) and K LM heads held as one
  (K, V, H) parameter, each a copy of the base output embedding (untied from GPT-2's `wte`) plus noise; or,
  with `head_rank: r`, K low-rank deltas W + A_k B_k on the shared base head (model/lowrank_heads.py). K = 1
  with a trainable trunk and no noise keeps a tied head tied (the model itself: plain DPO, as TRL trains it).
- `models` (Case 2, B.2): K full Hugging Face causal LMs (the base, or `init_paths[k]`).
- `lora`   (B.3 hybrid, beyond the paper): K `peft` LoRA adapters on one frozen base.

Every kind ends in `sequence_logps`, which runs the kernel `expert_logprobs` on response tokens only:
lp_k(row) = Σ_{t: labels[t+1] != -100} log softmax(heads_k · h_t)[labels[t+1]]   (docs/math.md §1 `policy_logps`).

Batch layout (docs/ARCHITECTURE.md): rows 0..B-1 chosen, B..2B-1 rejected, right padding; labels are
-100 on prompt and padding, so padded positions never enter a sum (causal attention keeps real tokens
blind to padding on their right).
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn as nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM, PreTrainedModel

from mixdpo_ds.compat import lora_layers, set_lora_active, set_lora_disabled
from mixdpo_ds.model.expert_init import add_noise_, build_lora, lora_noise_, noise_model_
from mixdpo_ds.model.experts_config import ExpertsConfig
from mixdpo_ds.model.hf_lm import (
    disable_dropout,
    gathered,
    head_weight,
    partitioned,
    register_heads_for_zero3,
    sequence_logps,
    trunk_hidden,
)
from mixdpo_ds.model.lowrank_heads import FusedLoss, LowRankHeads, build_lowrank_heads, fused_heads_loss


class PolicyOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 hooks the tensors of tuple/dict outputs only, and without its
    backward hook the heads are not re-gathered for the backward (empty saved tensors)."""
    logps: torch.Tensor                    # (2B, K) fp32 sums over response tokens
    prompt_features: torch.Tensor | None   # (2B, H) detached hidden state at the last prompt token
    ref_logps: torch.Tensor | None = None  # (2B,) π_ref log-probs from the same trunk pass (frozen-trunk heads)
    policy_loss: torch.Tensor | None = None  # forward(loss=FusedLoss): L_policy, differentiable (logps detached)
    resp: torch.Tensor | None = None         # forward(loss=FusedLoss): (B, K) responsibilities q, detached


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

    Exactly one of (trunk + heads | lowrank | tied_head), models, lora_model is given, matching cfg.kind.
    `ref_head` (V, H): the base head for the built-in reference of a frozen-trunk `heads` policy (and the shared
    head W of frozen low-rank heads); `base_head` (V, H): the trainable W of low-rank heads on a trainable trunk
    whose model does not tie its head (a tied one uses the input embedding itself); `tied_head`: K = 1, the
    model's own tied head (no copy).
    """

    def __init__(self, cfg: ExpertsConfig, config, *, trunk: nn.Module | None = None,
                 heads: torch.Tensor | None = None, models: list[PreTrainedModel] | None = None,
                 lora_model: nn.Module | None = None, ref_head: torch.Tensor | None = None,
                 lowrank: LowRankHeads | None = None, base_head: torch.Tensor | None = None, tied_head: bool = False):
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
        self.lowrank_heads = lowrank                                                 # up (K, V, r), down (K, r, H)
        self.base_head = nn.Parameter(base_head) if base_head is not None else None  # (V, H)
        self.tied_head = tied_head
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
        if (lowrank is not None or tied_head) and isinstance(self._shared_head(), nn.Parameter):
            # W is read outside its module (the input embedding when tied): ZeRO-3 must gather it
            register_heads_for_zero3(lowrank if lowrank is not None else self, [self._shared_head()])
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

    def _shared_head(self) -> torch.Tensor:
        """W (V, H) of low-rank / tied heads: the frozen base (ref_head), an untied trainable copy, or the trunk's
        input embedding (the tied model's own head)."""
        if self.ref_head is not None:
            return self.ref_head
        return self.base_head if self.base_head is not None else self.trunk.get_input_embeddings().weight

    def _heads_logps(self, hidden, labels):
        """`heads` kind: (logps (2B, K), ref_logps (2B,) or None) from the trunk's hidden states (2B, T, H)."""
        frozen = self.cfg.trunk == "frozen"
        if self.lowrank_heads is not None:   # the frozen base's column K is the reference, from the same pass
            logps = self.lowrank_heads(hidden, self._shared_head(), labels, frozen, self.cfg.logprob_impl,
                                       self.cfg.chunk_size)                             # (2B, K or K + 1)
            return logps[:, :self.num_experts], logps[:, self.num_experts].detach() if frozen else None
        if self.ep_heads is not None:
            from mixdpo_ds.model.parallel import ep_sequence_logps
            logps = ep_sequence_logps(self.ep_heads, hidden, labels)                     # (2B, K)
        else:
            heads = self._shared_head().unsqueeze(0) if self.tied_head else self.heads
            logps = self._logps(hidden, heads, labels)                                   # (2B, K)
        ref_logps = None
        if frozen and self.ref_head is not None:
            # the reference is the base head on the same frozen hidden states: no second trunk pass
            with torch.no_grad():
                ref_logps = self._logps(hidden, self.ref_head.unsqueeze(0), labels)[:, 0]   # (2B,)
        return logps, ref_logps

    @torch.no_grad()
    def expert_head(self, k: int) -> torch.Tensor:
        """Expert k's full (V, H) LM head (`heads` kind, dense: not expert-parallel)."""
        if self.lowrank_heads is not None:
            return self.lowrank_heads.dense(self._shared_head(), k)
        return self._shared_head() if self.tied_head else self.heads[k]

    def dense_heads(self) -> torch.Tensor:
        """All K heads as one (K, V, H) tensor, detached (`heads` kind, dense)."""
        return torch.stack([self.expert_head(k) for k in range(self.num_experts)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                prompt_last_index: torch.Tensor | None = None, reference: bool = False,
                loss: FusedLoss | None = None) -> PolicyOutput:
        """(2B, T) ids, mask, labels (-100 off the response) -> PolicyOutput(logps (2B, K) fp32, ...).

        `reference=True` -> the built-in reference's (2B,) log-probs instead (`reference_logps`): called through the
        engine, so that under ZeRO-3 its hooks gather what the reference reads (docs/deepspeed.md §7).
        `loss` (heads kind): also policy_loss and resp, from one pass without logits recompute (logps detached;
        model/lowrank_heads.py `fused_heads_loss`)."""
        if reference:
            return self.reference_logps(input_ids, attention_mask, labels)
        if self.kind == "heads":
            if self.cfg.trunk == "frozen":
                with torch.no_grad():
                    hidden = trunk_hidden(self.trunk, input_ids, attention_mask)
            else:
                hidden = trunk_hidden(self.trunk, input_ids, attention_mask)
            if loss is not None:
                features = _prompt_features(hidden, prompt_last_index)
                logps, ref_logps, policy_loss, resp = fused_heads_loss(
                    hidden, labels, features, loss, lowrank=self.lowrank_heads, heads=self.heads,
                    shared_head=None if self.tied_head else self._shared_head(),
                    frozen_ref=self.cfg.trunk == "frozen" and self.ref_head is not None, chunk_size=self.cfg.chunk_size)
                return PolicyOutput(logps, features, ref_logps, policy_loss, resp)
            logps, ref_logps = self._heads_logps(hidden, labels)
            return PolicyOutput(logps, _prompt_features(hidden, prompt_last_index), ref_logps)
        if loss is not None:
            raise ValueError(f"MixturePolicy.forward(loss=...): experts.kind='heads' only, got {self.kind!r}")
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
            if self.base_head is not None:   # the shared W of low-rank heads trains with the trunk
                trunk.append(("base_head", self.base_head))
            groups += _split_decay(trunk, "trunk", self.cfg.lr_trunk if self.cfg.lr_trunk is not None else lr,
                                   weight_decay)
            heads = [self.heads] if self.heads is not None else []      # a tied K = 1 head is in the trunk
            heads = list(self.ep_heads.parameters()) if self.ep_heads is not None else heads
            heads += list(self.lowrank_heads.parameters()) if self.lowrank_heads is not None else []
            if heads:
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
            head = self.expert_head(k)
            model.get_output_embeddings().weight.copy_(head.cpu())
            dtype = head.dtype
        else:
            state = self.models[k].state_dict()
            model.load_state_dict({n: t.cpu() for n, t in state.items()})
            dtype = next(self.models[k].parameters()).dtype
        return model.to(dtype).eval()


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
        frozen = cfg.trunk == "frozen"
        tied = weight is base.get_input_embeddings().weight
        if cfg.head_rank is not None:
            lowrank = build_lowrank_heads(head, cfg.num_experts, cfg.head_rank, cfg.init_noise, generator)
            return MixturePolicy(cfg, base.config, trunk=base.base_model, lowrank=lowrank,
                                 ref_head=head if frozen else None, base_head=None if frozen or tied else head)
        if cfg.num_experts == 1 and not frozen and tied and cfg.init_noise == 0 and cfg.ep_size == 1:
            return MixturePolicy(cfg, base.config, trunk=base.base_model, tied_head=True)
        heads = head.unsqueeze(0).repeat(cfg.num_experts, 1, 1)                           # (K, V, H), untied
        for k in range(cfg.num_experts):
            if cfg.init_noise > 0:
                add_noise_(heads[k], cfg.init_noise, generator, ref=head)
        ref_head = head if frozen else None
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
                noise_model_(model, cfg.init_noise, generator)
        return MixturePolicy(cfg, base.config, models=models)
    lora_model = build_lora(base, cfg, seed)
    if cfg.init_noise > 0:
        lora_noise_(lora_model, cfg.init_noise, generator)
    return MixturePolicy(cfg, base.config, lora_model=lora_model)
