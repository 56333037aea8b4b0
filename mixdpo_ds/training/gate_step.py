"""The gate's E-step and M-step, once per optimizer step, on the whole optimizer batch (docs/math.md §9).

The trainer runs the policy's E-step and M-step micro-batch by micro-batch and keeps what the gate needs in a
`StepRecord`. After the policy's optimizer step, `GateStep.step` uses it for all micro-batches of the step and all
ranks together, so `grad_accum = G, micro_batch = b` gives the same run as `grad_accum = 1, micro_batch = G·b`:

    closed_form  Mix-DPO (D.4): w ← normalise((1 − ρ) w + ρ · mean_i q_i) over the global batch, floored at w_min
    joint        MoE-DPO: one gradient step on L_gate (eq. 12) with the q the policy's M-step used
    alternate    MoE-DPO (paper §4.2): refresh, then the E-step under the current gate, then the L_gate step
    frozen       nothing (`em.gate_update=frozen`, or a gate without parameters)

A MoE gate is also held (not trained) for `gate.hold_steps` steps after the random warm-up.

Refresh (`em.refresh`, always on for `alternate`) is the paper's reward update: the policy log-probs are recomputed
after the policy step, so the gate's E-step sees the updated experts. λ_global · KL(w̄ ‖ U) takes w̄ over the global
batch through a differentiable all-reduce. The gate reads detached prompt features: it never trains the trunk.
What runs is decided once, in `GateStep.__init__`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mixdpo_ds.core.collapse import posterior_information
from mixdpo_ds.core.losses import kl_to_uniform
from mixdpo_ds.training.distributed import all_reduce_mean, differentiable_global_mean_rows, global_mean_rows

log = logging.getLogger("mixdpo_ds")
MODES = ("closed_form", "joint", "alternate", "frozen")
TRUST_ITERATIONS = 8  # gate.trust_region: refinements of the step's scale (each one gate forward on the batch)


@dataclass
class MicroRecord:
    """What one micro-batch leaves for the gate step and the callbacks (b pairs on this rank)."""

    batch: dict  # the collated micro-batch (CPU tensors)
    features: Tensor | None  # (b, H) detached prompt features, None without a prompt gate
    policy_logps: Tensor  # (b, 2, K) detached
    ref_logps: Tensor  # (b, 2) or (b, 2, K)
    log_w: Tensor  # (b, K) the gate's log-weights the policy's E-step used
    resp: Tensor  # (b, K) responsibilities of the E-step (Dirichlet during warm-up; mean z in Gumbel mode)
    margins: Tensor  # (b, K) expert margins Δ
    noise: Tensor | None  # (L, b, K) Gumbel noise of these rows
    metrics: dict[str, Tensor]


@dataclass
class StepRecord:
    """One optimizer step: its micro-batches in order, the gate step's metrics, the step's merged metrics."""

    warm: bool
    step: int = 0  # optimizer steps done before this one
    skipped: bool = False  # a non-finite loss or gradient dropped this step (training/guard.py)
    lambda_global: float = 0.0  # λ_global of the step's phase
    gate_noise: Tensor | None = None  # (L, G·b, K) fresh Gumbel noise for the `alternate` gate E-step
    micro: list[MicroRecord] = field(default_factory=list)
    gate_metrics: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def cat(self, name: str) -> Tensor | None:
        """The rank's rows of one field over all micro-batches, e.g. cat("resp") -> (G·b, K)."""
        parts = [getattr(m, name) for m in self.micro]
        if parts[0] is None:
            return None
        return torch.cat(parts, dim=1 if name == "noise" else 0)

    def cat_batch(self, key: str) -> Tensor:
        """A batch column over all micro-batches, e.g. cat_batch("group_ids") -> (G·b,)."""
        return torch.cat([m.batch[key] for m in self.micro])


def region_scale(step_kl, limit: Tensor, max_scale: float) -> Tensor:
    """The scale s ∈ [0, max_scale] of a step with step_kl(s) ≈ limit (docs/math.md eq. 12.1), from s = 1.

    step_kl(s) -> scalar tensor, the KL of the step scaled by s. A fixed number of refinements
    s ← min(max_scale, s · sqrt(limit / KL(s))), no branch on the KL and no host sync: nearby inputs (another batch
    split, another rank count: fp32 rounding) give nearby steps. A scale whose KL is still above 1.5 · limit did
    not converge: 0, no step this time (the optimizer's moments still moved).
    """
    cap = torch.tensor(max_scale, device=limit.device)
    scale = torch.ones((), device=limit.device)
    kl = step_kl(scale)
    for _ in range(TRUST_ITERATIONS):
        scale = torch.minimum(cap, scale * (limit / kl.clamp_min(1e-30)).sqrt())
        kl = step_kl(scale)
    return torch.where(kl > 1.5 * limit, torch.zeros_like(scale), scale)


def gate_mode(gate_kind: str, gate_update: str, has_parameters: bool) -> str:
    """Which of MODES runs, from the config: decided once at set-up."""
    if gate_update == "frozen":
        return "frozen"
    if gate_kind == "mix":
        return "closed_form"
    return gate_update if has_parameters else "frozen"


class GateStep:
    """The gate, its optimizer and its once-per-optimizer-step update."""

    def __init__(self, gate, gate_kind: str, gate_update: str, refresh: bool, lr: float, lr_lambda, world: int,
                 eps: float = 1e-8, hold_until: int = 0, trust_region: float = 0.0,
                 trust_max_scale: float = 1.0):
        self.gate, self.world, self.hold_until, self.trust_region = gate, world, hold_until, trust_region
        self.trust_max_scale = trust_max_scale
        params = list(gate.parameters())
        self.mode = gate_mode(gate_kind, gate_update, bool(params))
        self.refresh = self.mode == "alternate" or (self.mode == "closed_form" and refresh)
        if refresh and self.mode in ("joint", "frozen"):
            log.warning("em.refresh has no effect with gate mode %r (it only feeds the gate's E-step); use "
                        "em.gate_update=alternate for a MoE gate trained on refreshed responsibilities", self.mode)
        self.optimizer = self.scheduler = None
        if self.mode in ("joint", "alternate"):
            self.optimizer = torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=0.0)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    @property
    def by_gradient(self) -> bool:
        """True when the gate loss is optimised by gradient (MoE joint / alternate), so it belongs in `loss`."""
        return self.optimizer is not None

    def log_w(self, features: Tensor | None, user_ids: Tensor, batch_size: int, grad: bool = False) -> Tensor:
        """(B, K) log w of the gate for these pairs; features (B, H) or None, user_ids (B,)."""
        with torch.set_grad_enabled(grad):
            return self.gate(features, user_ids, batch_size=batch_size)

    def step(self, record: StepRecord, refresh_forward, loss_fn) -> dict[str, Tensor]:
        """The gate's E-step and M-step on the step's global batch; returns the gate metrics of the step.

        refresh_forward(batch) -> (policy_logps (b, 2, K), features (b, H) | None), no grad, after the policy step.
        loss_fn(policy_logps, ref_logps, log_w, resp=None, noise=None) -> MixDPOOutput (λ_global excluded).
        Held during the random warm-up: its responsibilities say nothing about the data.
        """
        if self.mode == "frozen" or record.warm:
            return {}
        if self.optimizer is not None and record.step < self.hold_until:  # gate.hold_steps: experts separate first
            return {}
        logps, feats = record.cat("policy_logps"), record.cat("features")
        if self.refresh:
            fresh = [refresh_forward(m.batch) for m in record.micro]
            logps = torch.cat([lp for lp, _ in fresh])
            feats = None if feats is None else torch.cat([f for _, f in fresh])
        ref, users, noise = record.cat("ref_logps"), record.cat_batch("user_ids"), record.cat("noise")
        if self.mode == "closed_form":
            log_w = record.cat("log_w")  # the weights did not change during the step
            resp = loss_fn(logps, ref, log_w, noise=noise).resp if self.refresh else record.cat("resp")
            self.gate.update(global_mean_rows(resp)[None])  # (1, K): the update only uses mean_i q_i
            return {}
        # MoE: L_gate on the whole batch. `joint` keeps the q (and Gumbel noise) the policy used; `alternate` takes
        # the E-step of the refreshed log-probs under the current gate. The policy log-probs are detached, so the
        # gradient reaches the gate only (in Gumbel mode through z as well as through KL(z ‖ w)).
        log_w = self.log_w(feats, users.to(logps.device), logps.shape[0], grad=True)
        if self.mode == "joint":
            res = loss_fn(logps, ref, log_w, resp=record.cat("resp") if noise is None else None, noise=noise)
        else:
            res = loss_fn(logps, ref, log_w, noise=record.gate_noise)
        loss = res.loss
        if record.lambda_global:
            loss = loss + record.lambda_global * kl_to_uniform(differentiable_global_mean_rows(log_w.float().exp()))
        loss.backward()
        if self.world > 1:  # the gate lives outside the engine: average its gradients by hand
            for p in self.gate.parameters():
                if p.grad is not None:
                    p.grad.copy_(all_reduce_mean(p.grad))
        metrics = {"gate_loss": (loss - res.policy_loss).detach()}
        if self.trust_region > 0:
            metrics.update(self._trust_region_step(log_w.detach(), res.margins.detach(), feats, users))
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    @torch.no_grad()
    def _trust_region_step(self, log_w: Tensor, margins: Tensor, feats: Tensor | None, users: Tensor) -> dict:
        """The optimizer's step, rescaled so the gate moves about ρ of the way to the posterior (docs/math.md §12):
        mean_i KL(w_i^new ‖ w_i) ≤ ρ² · mean_i KL(q_i ‖ w_i) over the global batch, the step lengthened up to
        `trust_max_scale` times when it falls short (with gate.trust_max_scale's default, 1000, the region, not
        gate.lr, sets the step).

        While the experts are alike q ≈ w, so the right side is ≈ 0 and the gate stays where it is, whatever its
        learning rate: it cannot commit to an assignment the experts' likelihoods do not support. KL grows about as
        the square of a small step, so the scale is refined as s ← s · sqrt(limit / KL(s)) (a few gate forwards;
        every rank sees the same all-reduced KL, so every rank takes the same step).
        """
        params = list(self.gate.parameters())
        old = [p.detach().clone() for p in params]
        self.optimizer.step()
        delta = [p.detach() - p0 for p, p0 in zip(params, old, strict=True)]
        info = all_reduce_mean(posterior_information(log_w, margins).float())
        limit = self.trust_region ** 2 * info

        def step_kl(scale: Tensor) -> Tensor:
            """Sets the gate to old + scale · delta; returns mean_i KL(w_i^new ‖ w_i) over the global batch."""
            for p, p0, d in zip(params, old, delta, strict=True):
                p.copy_(p0 + scale.to(p.dtype) * d)
            new_log_w = self.log_w(feats, users.to(log_w.device), log_w.shape[0])
            return all_reduce_mean((new_log_w.exp() * (new_log_w - log_w)).sum(-1).mean().float())

        scale = region_scale(step_kl, limit, self.trust_max_scale)
        kl = step_kl(scale)
        return {"gate/information": info, "gate/step_kl": kl, "gate/step_scale": scale}

    def state_dict(self) -> dict:
        return {"gate": self.gate.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def load_state_dict(self, state: dict) -> None:
        self.gate.load_state_dict(state["gate"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
