"""Gating weights w over the K experts (docs/math.md §1 `log_w`, §5; paper eq. 1, D.4, E user-aware routing).

- `MixGate` (Mix-DPO): one global weight vector, stored as the buffer log_w (K,), broadcast to (B, K);
  updated in closed form from the responsibilities (D.4): w ← normalise((1 − ρ) w + ρ · mean_i q_i),
  floored at w_min (`losses.mix_weight_update`). No gradient.
- `MoEGate` (MoE-DPO): log w(x) = log_softmax(g(x)) with g linear or an MLP on the prompt features
  (the policy's hidden state at the last prompt token), a user embedding or the user's features
  (`model/user_features.py`, paper App. G: routes unseen users), concatenated; trained
  by the gate loss (eq. 12) or pre-trained on a label column (`pretrain_gate`, the paper's §4.2 classifier).

Users: ids 0..num_users-1; -1 (no user) maps to one extra learned row, index num_users. A user the training data
did not have is routed by `population_log_w`, the mean of the training users' weights (docs/math.md §13.5).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mixdpo_ds.model.user_features import UserFeatureEncoder, UserFeatureSpec, parse_specs

GATE_KINDS = ("mix", "moe")
ARCHS = ("linear", "mlp")
FEATURES = ("prompt", "user", "prompt+user", "user_features", "prompt+user_features")
INITS = ("uniform", "random")


@dataclass
class GateConfig:
    kind: str = field(default="mix", metadata={"help": "mix (global weights, Mix-DPO) | moe (gating network)"})
    arch: str = field(default="linear", metadata={"help": "moe: linear | mlp (one hidden layer, GELU)"})
    mlp_hidden: int = field(default=64, metadata={"help": "moe mlp: hidden width"})
    features: str = field(default="prompt", metadata={
        "help": "moe inputs: prompt | user (id embedding) | prompt+user | user_features (gate.user_features columns, "
                "so an unseen user with known features is routed at once) | prompt+user_features"})
    user_features: list[dict] = field(default_factory=list, metadata={
        "help": "features=…user_features: the encoders, one per column: {column, kind: categorical | numeric, "
                "categories (categorical), dim (categorical embedding size, 4), size (numeric length, 1)}",
        "items": UserFeatureSpec})
    user_dim: int = field(default=16, metadata={"help": "moe: user embedding size"})
    num_users: int | None = field(default=None, metadata={"help": "number of user ids (None: from the data)"})
    rho: float = field(default=1.0, metadata={"help": "mix: closed-form step size in (0, 1]; 1 = minibatch "
                                                      "replacement (D.4)"})
    w_min: float = field(default=1e-3, metadata={
        "help": "floor of every weight, in [0, 1/K): mix: the closed form's floor; moe: w = w_min + (1 − K·w_min)·"
                "softmax(g), so no weight reaches 0 and the posterior can always move a user or prompt again"})
    adam_epsilon: float | None = field(default=None, metadata={
        "help": "moe: AdamW ε of the gate's optimizer (null: train.adam_epsilon). Adam moves every weight by about "
                "gate.lr per step whatever the gradient's size; a larger ε makes a near-zero gradient (experts still "
                "alike, q ≈ w) move the gate little instead of by ±lr"})
    hold_steps: int = field(default=0, metadata={
        "help": "moe: optimizer steps (after em.warmup_random_steps) during which the gate is not trained, so the "
                "experts separate before the gate commits (a gate warm-up against lock-in; for gate.user_features "
                "that may be noise, ~a quarter of the run: docs/math.md §14)"})
    trust_region: float = field(default=0.1, metadata={
        "help": "moe: ρ > 0 scales each gate step so that mean_i KL(w_i^new ‖ w_i) = ρ² · mean_i KL(q_i ‖ w_i) "
                "(the gate moves about ρ of the way to the experts' posterior); while the experts are alike q ≈ w "
                "and the gate cannot commit to an assignment they do not support, whatever gate.lr "
                "(docs/math.md §12; ρ = 0.1 with trust_max_scale 1000 measured in benchmarks/RESULTS.md, 'Gate "
                "lock-in'). 0 = off"})
    trust_max_scale: float = field(default=1000.0, metadata={
        "help": "moe, with gate.trust_region: the most a gate step is scaled. 1000 (default): short steps are "
                "lengthened too, so the region, not gate.lr, sets the step (gate.lr 1e-3 to 0.3 routed alike in "
                "every seed); 1 = the region only shrinks the optimizer's step (then gate.lr 1e-3 under-trains)"})
    lr: float = field(default=5e-2, metadata={
        "help": "moe: gate learning rate. With the default trust region (ρ = 0.1, trust_max_scale 1000) it only "
                "sets the optimizer's first trial step: gate.lr 1e-3 to 0.3 route alike (benchmarks/RESULTS.md, "
                "'Gate lock-in'); without the region it is the step size. 0.05 is the demo's"})
    init: str = field(default="uniform", metadata={"help": "uniform (w = 1/K at start) | random (mix: Dirichlet(1) "
                                                           "sample; moe: default layer init)"})
    pretrain_steps: int = field(default=0, metadata={"help": "supervised gate pre-training steps on a label column"})
    pretrain_label_column: str | None = field(default=None, metadata={
        "help": "dataset column whose label id is the target expert of `pretrain_gate`"})

    def __post_init__(self):
        for key, value, allowed in (("kind", self.kind, GATE_KINDS), ("arch", self.arch, ARCHS),
                                    ("features", self.features, FEATURES), ("init", self.init, INITS)):
            if value not in allowed:
                raise ValueError(f"gate.{key}={value!r}: allowed {allowed}")
        if not 0 < self.rho <= 1:
            raise ValueError(f"gate.rho={self.rho}: must be in (0, 1]")
        if self.w_min < 0:
            raise ValueError(f"gate.w_min={self.w_min}: must be >= 0 (and < 1/K)")
        if self.uses_user_features and not self.user_features:
            raise ValueError(f"gate.features={self.features!r} needs gate.user_features (the feature columns and "
                             "their encoders)")
        self.user_features = [asdict(s) for s in parse_specs(self.user_features)]  # validated, stored as mappings
        if self.mlp_hidden < 1 or self.user_dim < 1:
            raise ValueError("gate.mlp_hidden and gate.user_dim must be >= 1")
        if self.num_users is not None and self.num_users < 0:
            raise ValueError(f"gate.num_users={self.num_users}: must be >= 0")
        if self.trust_region < 0:
            raise ValueError(f"gate.trust_region={self.trust_region}: must be >= 0 (0 = off)")
        if not self.trust_max_scale > 0:
            raise ValueError(f"gate.trust_max_scale={self.trust_max_scale}: must be > 0 (1 = shrink only)")
        if self.adam_epsilon is not None and not 0 < self.adam_epsilon < 1e3:
            raise ValueError(f"gate.adam_epsilon={self.adam_epsilon}: must be in (0, 1000) or null")
        if self.hold_steps < 0:
            raise ValueError(f"gate.hold_steps={self.hold_steps}: must be >= 0")
        if self.pretrain_steps < 0:
            raise ValueError(f"gate.pretrain_steps={self.pretrain_steps}: must be >= 0")
        if self.pretrain_steps > 0 and not self.pretrain_label_column:
            raise ValueError("gate.pretrain_steps > 0 needs gate.pretrain_label_column")

    @property
    def uses_prompt(self) -> bool:
        return self.kind == "moe" and "prompt" in self.features

    @property
    def uses_user(self) -> bool:
        """Routes by user (an id embedding or the user's features): needs user ids in the data."""
        return self.kind == "moe" and bool({"user", "user_features"} & set(self.features.split("+")))

    @property
    def uses_user_embedding(self) -> bool:
        return self.kind == "moe" and "user" in self.features.split("+")

    @property
    def uses_user_features(self) -> bool:
        return self.kind == "moe" and "user_features" in self.features.split("+")


def _batch_size(prompt_features: torch.Tensor | None, user_ids: torch.Tensor | None, batch_size: int | None) -> int:
    for t in (prompt_features, user_ids):
        if t is not None:
            return t.shape[0]
    if batch_size is None:
        raise ValueError("gate forward needs prompt_features, user_ids or batch_size")
    return batch_size


class MixGate(nn.Module):
    """Global mixture weights: log_w (K,) buffer, forward -> (B, K) broadcast; `update` is D.4's closed form."""

    def __init__(self, cfg: GateConfig, num_experts: int, seed: int = 0):
        super().__init__()
        if not cfg.w_min * num_experts < 1:
            raise ValueError(f"gate.w_min={cfg.w_min}: must be < 1/K = {1 / num_experts:.4g}")
        self.cfg, self.num_experts = cfg, num_experts
        if cfg.init == "random":
            g = torch.Generator().manual_seed(seed)
            w = -torch.rand(num_experts, generator=g).clamp_min(1e-12).log()   # Exp(1) draws -> Dirichlet(1)
            w = (w / w.sum()).clamp_min(max(cfg.w_min, 1e-12))
            log_w = (w / w.sum()).log()
        else:
            log_w = torch.full((num_experts,), -math.log(num_experts))
        self.register_buffer("log_w", log_w)                                   # (K,)

    def forward(self, prompt_features: torch.Tensor | None = None, user_ids: torch.Tensor | None = None,
                batch_size: int | None = None) -> torch.Tensor:
        """-> (B, K) log weights, the same row for every pair."""
        B = _batch_size(prompt_features, user_ids, batch_size)
        return self.log_w.unsqueeze(0).expand(B, -1)

    @torch.no_grad()
    def update(self, resp: torch.Tensor) -> torch.Tensor:
        """resp (B, K) responsibilities -> new w (K,) (D.4: w ← normalise((1 − ρ) w + ρ · mean_i q_i) ≥ w_min)."""
        from mixdpo_ds.core.losses import mix_weight_update

        w = mix_weight_update(self.log_w.exp(), resp.detach().to(self.log_w.device), self.cfg.rho, self.cfg.w_min)
        self.log_w.copy_(w.log().to(self.log_w.dtype))
        return w


class MoEGate(nn.Module):
    """log w(x, u) = log_softmax(g([prompt_features, user_embedding])) -> (B, K)."""

    def __init__(self, cfg: GateConfig, num_experts: int, hidden_size: int, num_users: int | None = None):
        super().__init__()
        if not cfg.w_min * num_experts < 1:
            raise ValueError(f"gate.w_min={cfg.w_min}: must be < 1/K = {1 / num_experts:.4g}")
        self.cfg, self.num_experts, self.hidden_size = cfg, num_experts, hidden_size
        self.num_users = num_users if num_users is not None else cfg.num_users
        in_dim = hidden_size if cfg.uses_prompt else 0
        self.user_embedding = self.user_features = None
        if cfg.uses_user_features:
            if self.num_users is None:
                raise ValueError("gate.features uses 'user_features' but gate.num_users is unknown (set it or pass "
                                 "the data's)")
            self.user_features = UserFeatureEncoder(cfg.user_features, self.num_users)
            in_dim += self.user_features.width
        if cfg.uses_user_embedding:
            if self.num_users is None:
                raise ValueError("gate.features uses 'user' but gate.num_users is unknown (set it or pass the data's)")
            self.user_embedding = nn.Embedding(self.num_users + 1, cfg.user_dim)     # last row: no user (-1)
            in_dim += cfg.user_dim
        if cfg.arch == "linear":
            self.net = nn.Linear(in_dim, num_experts)
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, cfg.mlp_hidden), nn.GELU(),
                                     nn.Linear(cfg.mlp_hidden, num_experts))
        if cfg.init == "uniform":
            last = self.net if cfg.arch == "linear" else self.net[-1]
            nn.init.zeros_(last.weight)   # zero logits: w = 1/K for every input at start
            nn.init.zeros_(last.bias)

    def forward(self, prompt_features: torch.Tensor | None = None, user_ids: torch.Tensor | None = None,
                batch_size: int | None = None, user_features: tuple | None = None) -> torch.Tensor:
        """prompt_features (B, H), user_ids (B,) long (-1: none) -> (B, K) log weights. user_features: the users'
        encoded features (`self.user_features.encode`) instead of the table rows of user_ids (unseen users)."""
        inputs = []
        if self.cfg.uses_prompt:
            if prompt_features is None:
                raise ValueError("gate.features uses 'prompt' but no prompt_features were given")
            inputs.append(prompt_features.to(self.net_dtype))
        if self.user_embedding is not None:
            if user_ids is None:
                raise ValueError("gate.features uses 'user' but no user_ids were given")
            ids = user_ids.long().to(self.user_embedding.weight.device)
            if (ids >= self.num_users).any() or (ids < -1).any():
                raise ValueError(f"user id out of range [-1, {self.num_users}) (gate.num_users={self.num_users})")
            inputs.append(self.user_embedding(torch.where(ids < 0, self.num_users, ids)))
        if self.user_features is not None:
            inputs.append(self.user_features(user_ids, user_features).to(self.net_dtype))
        x = torch.cat(inputs, dim=-1)                                  # (B, in_dim)
        log_w = F.log_softmax(self.net(x).float(), dim=-1)             # (B, K) fp32
        eps = self.cfg.w_min
        if eps == 0:
            return log_w
        # log(ε + (1 − Kε) softmax(g)), computed in log space
        return torch.logaddexp(torch.full_like(log_w, math.log(eps)), log_w + math.log1p(-self.num_experts * eps))

    @property
    def net_dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def has_population_prior(self) -> bool:
        """True for a gate on user ids with training users: a user the training data did not have is routed by
        `population_log_w`, not by the shared no-user row."""
        return self.user_embedding is not None and bool(self.num_users)

    @torch.no_grad()
    def population_log_w(self, prompt_features: torch.Tensor | None, batch_size: int,
                         chunk: int = 256) -> torch.Tensor:
        """(B, K) log w̄(x) = log (1/U) Σ_u w(x, u) over the U training users' rows: the prior of a user the
        training data did not have under the per-user model (one latent expert per user, z_u ~ w̄; docs/math.md
        §13.5). The shared no-user row is no such prior: only training pairs without a user reach it. `chunk` users
        per forward. Without prompt features (a gate on user ids only) w̄ is one vector, computed once and
        expanded to the B rows."""
        if not self.has_population_prior:
            raise ValueError("population_log_w needs a gate on user ids (gate.features …user) with training users")
        if prompt_features is None and batch_size != 1:
            return self.population_log_w(None, 1, chunk).expand(batch_size, -1)
        total = None
        for ids in torch.arange(self.num_users, device=self.user_embedding.weight.device).split(chunk):
            n = ids.numel()  # rows user-major: user j's copy of the batch is rows j·B..(j+1)·B-1
            feats = None if prompt_features is None else prompt_features.repeat(n, 1)
            part = torch.logsumexp(self(feats, ids.repeat_interleave(batch_size), batch_size=n * batch_size)
                                   .view(n, batch_size, -1), dim=0)
            total = part if total is None else torch.logaddexp(total, part)
        return total - math.log(self.num_users)


def build_gate(cfg: GateConfig, num_experts: int, hidden_size: int, num_users: int | None = None,
               seed: int = 0) -> MixGate | MoEGate:
    if cfg.kind == "mix":
        return MixGate(cfg, num_experts, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MoEGate(cfg, num_experts, hidden_size, num_users)


def pretrain_gate(gate: MixGate | MoEGate, features: torch.Tensor | None, labels: torch.Tensor, steps: int,
                  lr: float, user_ids: torch.Tensor | None = None, batch_size: int | None = None,
                  seed: int = 0) -> float:
    """Supervised pre-training: cross-entropy of log w(x) against label ids (label id = expert id); returns the
    final accuracy of argmax_k w on the given examples.

    features (n, H) or None, labels (n,) long in [0, K), user_ids (n,) or None. Full batch Adam when batch_size
    is None, else minibatches drawn with a generator seeded `seed`. MixGate has no inputs: its weights become
    the label frequencies (the maximum-likelihood solution, floored at w_min as in D.4's update), in one step.
    """
    labels = labels.long()
    if isinstance(gate, MixGate):
        from mixdpo_ds.core.losses import mix_weight_update

        one_hot = F.one_hot(labels, gate.num_experts).float()                # (n, K)
        w = mix_weight_update(gate.log_w.exp(), one_hot, rho=1.0, w_min=gate.cfg.w_min)
        gate.log_w.copy_(w.log().to(gate.log_w.dtype))
        return float((labels == gate.log_w.argmax()).float().mean())
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    for _ in range(steps):
        idx = torch.arange(n) if batch_size is None else torch.randint(n, (batch_size,), generator=g)
        log_w = gate(None if features is None else features[idx], None if user_ids is None else user_ids[idx],
                     batch_size=len(idx))
        loss = F.nll_loss(log_w, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = gate(features, user_ids, batch_size=n).argmax(-1)
    return float((pred == labels).float().mean())


def save_gate(gate: MixGate | MoEGate, cfg: GateConfig, out_dir: str, user_vocab: dict | None = None) -> None:
    """out_dir/gate.safetensors (state dict, buffers included) + out_dir/gate.json (config, K, hidden, users)."""
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in gate.state_dict().items()}
    save_file(state, os.path.join(out_dir, "gate.safetensors"))
    meta = {"config": asdict(cfg), "num_experts": gate.num_experts,
            "hidden_size": getattr(gate, "hidden_size", None), "num_users": getattr(gate, "num_users", None),
            "user_vocab": user_vocab}
    with open(os.path.join(out_dir, "gate.json"), "w") as f:
        json.dump(meta, f, indent=2)


def load_gate(out_dir: str, with_meta: bool = False):
    """The gate saved by `save_gate` (and, with_meta, the gate.json dict, which holds `user_vocab`)."""
    with open(os.path.join(out_dir, "gate.json")) as f:
        meta = json.load(f)
    cfg = GateConfig(**meta["config"])
    if cfg.kind == "mix":
        gate = MixGate(cfg, meta["num_experts"])
    else:
        gate = MoEGate(cfg, meta["num_experts"], meta["hidden_size"], meta["num_users"])
    gate.load_state_dict(load_file(os.path.join(out_dir, "gate.safetensors")))
    return (gate, meta) if with_meta else gate
