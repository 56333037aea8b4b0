"""EM schedule configuration: `EMConfig` (``em.*``), the E.1 regulariser phases, the τ schedule and
the Dirichlet-random warm-up responsibilities.

The math itself lives in `mixdpo_ds.core.losses` (exact E-step) and `mixdpo_ds.core.gumbel` (relaxation).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from mixdpo_ds.core.gumbel import GumbelConfig
from mixdpo_ds.core.losses import EStepWeights, e_step_temperature

EM_MODES = ("exact", "gumbel")
GATE_UPDATES = ("joint", "alternate", "frozen")


@dataclass
class Phase:
    """One row of the E.1 regulariser table: the weights in force from ``start`` until the next phase."""

    start: float = field(default=0.0, metadata={"help": "Training progress in [0, 1) where this phase begins."})
    lambda_ent: float = field(default=0.0, metadata={"help": "λ_ent of the E-step (exploration)."})
    lambda_conf: float = field(default=0.0, metadata={"help": "λ_conf of the E-step (specialisation)."})
    lambda_unif: float = field(default=0.0, metadata={"help": "λ_KL_unif of the E-step (anti-collapse)."})
    lambda_w: float = field(default=1.0, metadata={"help": "λ_KL_w of the E-step (1 = exact posterior)."})
    lambda_global: float = field(default=0.0, metadata={"help": "λ_KL_w_global: KL(w̄ ‖ U) in the gate loss."})
    beta: float | None = field(default=None, metadata={"help": "β during this phase; None keeps the run's β."})

    def __post_init__(self):
        if not 0 <= self.start < 1:
            raise ValueError(f"em.phases[].start must be in [0, 1), got {self.start!r}")
        for key in ("lambda_ent", "lambda_conf", "lambda_unif", "lambda_w", "lambda_global"):
            if getattr(self, key) < 0:
                raise ValueError(f"em.phases[].{key} must be >= 0, got {getattr(self, key)!r}")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"em.phases[].beta must be > 0 or null, got {self.beta!r}")
        e_step_temperature(self.lambda_w, self.lambda_ent, self.lambda_conf, self.lambda_unif)

    @property
    def estep(self) -> EStepWeights:
        return EStepWeights(self.lambda_w, self.lambda_ent, self.lambda_conf, self.lambda_unif)


@dataclass
class PhaseSchedule:
    """Piecewise-constant regulariser schedule over training progress (E.1 table)."""

    phases: list[Phase] = field(metadata={"help": "Phases sorted by start; the first must start at 0."})

    def __post_init__(self):
        self.phases = [p if isinstance(p, Phase) else Phase(**p) for p in self.phases]
        starts = [p.start for p in self.phases]
        if not starts or starts[0] != 0:
            raise ValueError(f"em.phases must be non-empty and the first must have start 0, got starts {starts}")
        if any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
            raise ValueError(f"em.phases[].start must be strictly increasing, got {starts}")

    def at(self, progress: float) -> Phase:
        """The phase in force at ``progress`` (fraction of training done, clamped to [0, 1])."""
        progress = min(max(progress, 0.0), 1.0)
        return self.phases[bisect.bisect_right([p.start for p in self.phases], progress) - 1]

    @classmethod
    def paper_default(cls, beta: float) -> PhaseSchedule:
        """E.1 table. λ_w = 1 stays on throughout: it is the ELBO's own KL(q ‖ w), and α = 1 is exact EM.

        early [0, 0.3):   λ_ent = λ_unif = 0.5, λ_global = 0.1  → α = 2    (softened q, broad participation)
        middle [0.3, 0.7): λ_conf = 0.5                           → α = 0.5  (sharpened q, specialisation)
        late [0.7, 1]:    λ_conf = 0.5, λ_w = 1.5, β/2           → α = 1, prior weight 1.5 (stabilisation)
        """
        return cls([
            Phase(start=0.0, lambda_ent=0.5, lambda_unif=0.5, lambda_w=1.0, lambda_global=0.1, beta=beta),
            Phase(start=0.3, lambda_conf=0.5, lambda_w=1.0, beta=beta),
            Phase(start=0.7, lambda_conf=0.5, lambda_w=1.5, beta=beta / 2),
        ])


@dataclass
class EMConfig:
    """Variational EM settings (``em.*``); constructible as ``EMConfig(**yaml_dict)``."""

    mode: str = field(default="exact", metadata={"help": "'exact': closed-form E-step; 'gumbel': E.2 relaxation."})
    posterior_correction: int = field(
        default=1, metadata={"help": "c in m = Δ + c·sg(Δ − ΔR): 1 = eq. 11 with q^(r), 0 = plain DPO margin."})
    refresh: bool = field(
        default=False, metadata={"help": "Recompute policy log-probs after the M-step (the paper's reward update)."})
    warmup_random_steps: int = field(
        default=0, metadata={"help": "Steps with Dirichlet-random responsibilities, to break expert symmetry."})
    dirichlet_alpha: float = field(default=1.0, metadata={"help": "Concentration of the warm-up Dirichlet."})
    gate_update: str = field(
        default="joint", metadata={"help": "'joint' (one backward), 'alternate' (paper §4.2) or 'frozen'."})
    split_every: int = field(default=0, metadata={
        "help": "Every this many optimizer steps (after the random warm-up) check the collapse detectors on the "
                "recent training pairs and re-seed each dead or merged expert by splitting the most loaded one: copy "
                "+ noise, its gate mass shared (split-and-merge EM, docs/math.md §12). 0 = off."})
    split_noise: float = field(default=0.05, metadata={
        "help": "std of the noise added to a split copy, relative to the std of the source expert's weights."})
    split_max: int = field(default=3, metadata={
        "help": "The most splits in one run: a mixture that keeps collapsing is reported, not split forever."})
    estep: EStepWeights = field(default_factory=EStepWeights, metadata={"help": "Lemma-6 E-step weights."})
    gumbel: GumbelConfig = field(default_factory=GumbelConfig, metadata={"help": "Monte Carlo relaxation."})
    tau_min: float = field(default=0.5, metadata={"help": "Final Gumbel temperature (F.1: keep τ > 0.5)."})
    tau_anneal_steps: int = field(
        default=0, metadata={"help": "Steps to anneal τ geometrically from gumbel.tau to tau_min; 0 = constant."})
    lambda_global: float = field(
        default=0.0, metadata={"help": "λ_KL_w_global of the gate loss when no phase schedule sets it."})
    phases: list[dict] | str | None = field(
        default=None,
        metadata={"help": "Regulariser phases (list of Phase fields), 'paper' for the E.1 default, or null "
                          "for the fixed estep / lambda_global.",
                  "items": Phase})  # the run config type-checks each phase mapping against Phase's fields
    label_smoothing: float = field(default=0.0, metadata={"help": "ε of conservative DPO, in [0, 0.5)."})

    def __post_init__(self):
        if self.mode not in EM_MODES:
            raise ValueError(f"em.mode must be one of {list(EM_MODES)}, got {self.mode!r}")
        if self.posterior_correction not in (0, 1):
            raise ValueError(f"em.posterior_correction must be one of [0, 1], got {self.posterior_correction!r}")
        if self.gate_update not in GATE_UPDATES:
            raise ValueError(f"em.gate_update must be one of {list(GATE_UPDATES)}, got {self.gate_update!r}")
        if int(self.warmup_random_steps) != self.warmup_random_steps or self.warmup_random_steps < 0:
            raise ValueError(f"em.warmup_random_steps must be an integer >= 0, got {self.warmup_random_steps!r}")
        if not self.dirichlet_alpha > 0:
            raise ValueError(f"em.dirichlet_alpha must be > 0, got {self.dirichlet_alpha!r}")
        for key in ("split_every", "split_max"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"em.{key} must be an integer >= 0, got {getattr(self, key)!r}")
        if not self.split_noise >= 0:
            raise ValueError(f"em.split_noise must be >= 0, got {self.split_noise!r}")
        if isinstance(self.estep, dict):
            self.estep = EStepWeights(**self.estep)
        if isinstance(self.gumbel, dict):
            self.gumbel = GumbelConfig(**self.gumbel)
        if not 0 < self.tau_min <= self.gumbel.tau:
            raise ValueError(f"em.tau_min must be in (0, em.gumbel.tau={self.gumbel.tau}], got {self.tau_min!r}")
        if int(self.tau_anneal_steps) != self.tau_anneal_steps or self.tau_anneal_steps < 0:
            raise ValueError(f"em.tau_anneal_steps must be an integer >= 0, got {self.tau_anneal_steps!r}")
        if self.lambda_global < 0:
            raise ValueError(f"em.lambda_global must be >= 0, got {self.lambda_global!r}")
        if isinstance(self.phases, str) and self.phases != "paper":
            raise ValueError(f"em.phases must be a list of phases, 'paper' or null, got {self.phases!r}")
        if isinstance(self.phases, list):
            self.phases = [asdict(p) if isinstance(p, Phase) else dict(p) for p in self.phases]
            PhaseSchedule(self.phases)  # validate now, with the key names in the errors
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"em.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")

    def schedule(self, beta: float) -> PhaseSchedule:
        """The phase schedule for a run with β = ``beta``; without phases, one phase from the fixed weights."""
        if self.phases == "paper":
            return PhaseSchedule.paper_default(beta)
        if self.phases:
            return PhaseSchedule(self.phases)
        e = self.estep
        return PhaseSchedule([Phase(0.0, e.lambda_ent, e.lambda_conf, e.lambda_unif, e.lambda_w,
                                    self.lambda_global, beta)])


def tau_at(step: int, cfg: EMConfig) -> float:
    """Gumbel temperature at ``step``: τ_0 (τ_min / τ_0)^(min(step, N) / N), N = tau_anneal_steps.

    Geometric (exponential-in-step) annealing as in Jang et al. 2017, reaching τ_min exactly at step N
    and staying there; N = 0 keeps τ = τ_0.
    """
    tau0, n = cfg.gumbel.tau, cfg.tau_anneal_steps
    if n == 0:
        return float(tau0)
    frac = min(max(step, 0), n) / n
    return float(math.exp(math.log(tau0) + frac * (math.log(cfg.tau_min) - math.log(tau0))))


def random_responsibilities(B: int, K: int, alpha: float = 1.0, generator: torch.Generator | None = None,
                            device=None) -> Tensor:
    """Dirichlet(α·1_K) responsibilities (B, K) for the symmetry-breaking warm-up (docs/math.md §8), fp32.

    torch's Dirichlet sampler takes no generator, so a seed is drawn from ``generator`` and the sample
    is taken under a forked CPU RNG: reproducible per generator, and the global RNG is untouched.
    """
    if not alpha > 0:
        raise ValueError(f"em.dirichlet_alpha must be > 0, got {alpha!r}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resp = torch.distributions.Dirichlet(torch.full((K,), float(alpha))).sample((B,))
    return resp.to(device) if device is not None else resp
