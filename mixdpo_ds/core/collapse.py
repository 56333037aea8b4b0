"""Detectors of mixture collapse, and the split-and-merge re-seeding that undoes it, as pure tensor functions.

A K-expert mixture can collapse in three ways (docs/math.md §8 is about the symmetric start; this module detects
the same failure later in training). Inputs, per batch or per evaluation pass over N pairs:

    margins  Δ_ik  (N, K)   expert k's margin on pair i (`MixDPOOutput.margins`)
    resp     q_ik  (N, K)   responsibilities (E-step posterior or mean Gumbel sample); (K,) is read as one row
    w        w_ik  (N, K)   gate weights (probabilities, not log); Mix-DPO's global w (K,) is read as one row

Rules and thresholds
--------------------
1. Merged experts (`merged_experts`): experts j < k are merged when, over the N pairs, BOTH
       sign agreement   mean_i [sign Δ_ij = sign Δ_ik]  ≥ agree      (default 0.95), and
       Pearson r(Δ_·j, Δ_·k)                              ≥ min_corr   (default 0.95),
   and only when N ≥ min_pairs (default 8; fewer pairs say nothing). Why both:
   - sign agreement alone is high for ANY two good experts: on the easy pairs every competent expert prefers the
     chosen response, so two genuinely different specialists can agree on 96% of the signs. What tells two
     identical experts apart from two good ones is that their margins move together pair by pair, in magnitude
     too: the correlation.
   - correlation alone is blind to an offset or a sign-preserving rescale: Δ_k = Δ_j + c has r = 1, yet the two
     experts prefer different responses on every pair with Δ_ij between −c and 0; the sign rule rejects that.
   An expert whose margins are constant over the pairs (e.g. Δ ≡ 0 at step 0, when every expert still equals
   π_ref; test: std ≤ 1e-6·max|Δ|) has no defined correlation: r is taken as 0 (no evidence), so it is never
   reported merged and never raises `max_margin_corr`.
2. Dead experts (`dead_experts`): experts whose mean responsibility mean_i q_ik is strictly below min_mass
   (default 0.02, an absolute mass, the same for every K; compare 1/K, the share of a balanced mixture: 0.02 is
   1/50, i.e. 10% of the balanced share at K = 5). A dead expert receives (almost) no policy gradient (eq. 12
   weights expert k's loss by q_ik), so it cannot recover by itself.
3. Saturated gate (`saturated_gate`): the gate's mean entropy mean_i H(w_i) is strictly below
   entropy_frac · log K (default 0.05, i.e. 5% of the entropy of the uniform gate) WHILE some experts are
   still merged (rule 1). A confident gate is the goal when the experts differ; a confident gate over experts that
   are still copies of each other has frozen an arbitrary assignment and stops the E-step from splitting them.
   Example, K = 3: w = (0.99, 0.005, 0.005) has H = 0.0629 > 0.0549 = 0.05·log 3 (not saturated);
   w = (0.998, 0.001, 0.001) has H = 0.0158 (saturated, if experts are merged). K = 1 is never saturated.

`collapse_report` returns the three verdicts, `collapse_metrics` the scalars to log (``collapse/…``).

Repair (split-and-merge EM re-seeding): `split_source` picks the most loaded expert (argmax mean responsibility);
`split_expert` copies it into the dead expert's weights and adds Gaussian noise with std = noise · std(source
weights) to the copy, in place; `split_responsibility` gives the new Mix weights, the source's mass shared
equally between source and dead expert (the dead expert's own mass is dropped) and renormalised. A floor such as
`gate.w_min` is the caller's to apply afterwards (`mix_weight_update` does it).

Imports only torch and mixdpo_ds.core (layer 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "margin_correlation", "sign_agreement", "merged_experts", "dead_experts", "gate_entropy", "saturated_gate",
    "collapse_report", "collapse_metrics", "split_source", "split_expert", "split_responsibility",
    "posterior_information",
]

_CONST_RTOL = 1e-6  # an expert's margins count as constant when std ≤ _CONST_RTOL · max|Δ|


def _matrix(x: Tensor, name: str, k: int | None = None) -> Tensor:
    """x as a detached float64 (N, K) matrix; a (K,) vector is one row."""
    x = torch.as_tensor(x).detach()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name} must be (N, K) or (K,), got shape {tuple(x.shape)}")
    if k is not None and x.shape[1] != k:
        raise ValueError(f"{name} has K = {x.shape[1]}, expected {k}")
    return x.double()


def margin_correlation(margins: Tensor) -> Tensor:
    """Pearson correlation of the experts' margins over the pairs: (N, K) → (K, K) float64.

    The diagonal is 1 for a non-constant expert; a constant expert (std ≤ 1e-6·max|Δ|) gets 0 in its row and
    column (its correlation is undefined; see the module docstring).
    """
    m = _matrix(margins, "margins")
    centred = m - m.mean(0, keepdim=True)
    norm = centred.norm(dim=0)  # (K,) = sqrt(N) · std
    scale = m.abs().amax(0) * math.sqrt(m.shape[0])
    const = norm <= _CONST_RTOL * scale  # also true for Δ ≡ 0 (0 ≤ 0)
    safe = torch.where(const, torch.ones_like(norm), norm)
    corr = (centred.T @ centred) / (safe[:, None] * safe[None, :])
    corr = corr.clamp(-1.0, 1.0)
    return corr.masked_fill(const[:, None] | const[None, :], 0.0)


def sign_agreement(margins: Tensor) -> Tensor:
    """Fraction of the pairs on which experts j and k have the same margin sign: (N, K) → (K, K) float64.

    sign is torch.sign (a margin of exactly 0 agrees only with 0).
    """
    s = torch.sign(_matrix(margins, "margins"))
    return (s[:, :, None] == s[:, None, :]).double().mean(0)


def merged_experts(margins: Tensor, agree: float = 0.95, min_corr: float = 0.95,
                   min_pairs: int = 8) -> list[tuple[int, int]]:
    """Pairs (j, k), j < k, of experts whose margins agree in sign on ≥ `agree` of the pairs AND have Pearson
    correlation ≥ `min_corr` (rule 1 of the module docstring). [] when fewer than `min_pairs` pairs."""
    m = _matrix(margins, "margins")
    if m.shape[0] < min_pairs:
        return []
    hit = (sign_agreement(m) >= agree) & (margin_correlation(m) >= min_corr)
    hit = torch.triu(hit, diagonal=1)
    return [(int(j), int(k)) for j, k in hit.nonzero().tolist()]


def dead_experts(resp: Tensor, min_mass: float = 0.02) -> list[int]:
    """Experts whose mean responsibility over the pairs is strictly below `min_mass` (absolute; rule 2)."""
    mass = _matrix(resp, "resp").mean(0)
    return [int(k) for k in (mass < min_mass).nonzero().flatten().tolist()]


def gate_entropy(w: Tensor) -> Tensor:
    """Mean over the pairs of the gate's entropy H(w_i) = −Σ_k w_ik log w_ik (0 log 0 = 0), in nats; float64."""
    p = _matrix(w, "w")
    return -torch.special.xlogy(p, p).sum(-1).mean()


def saturated_gate(w: Tensor, margins: Tensor, entropy_frac: float = 0.05, agree: float = 0.95,
                   min_corr: float = 0.95, min_pairs: int = 8) -> bool:
    """Gate mean entropy < entropy_frac · log K while some experts are still merged (rule 3)."""
    K = _matrix(margins, "margins").shape[1]
    if K < 2 or not gate_entropy(_matrix(w, "w", K)) < entropy_frac * math.log(K):
        return False
    return bool(merged_experts(margins, agree=agree, min_corr=min_corr, min_pairs=min_pairs))


def collapse_report(margins: Tensor, resp: Tensor, w: Tensor, agree: float = 0.95, min_corr: float = 0.95,
                    min_pairs: int = 8, min_mass: float = 0.02, entropy_frac: float = 0.05) -> dict:
    """{"merged": [(j, k), …], "dead": [k, …], "saturated": bool} (rules 1–3)."""
    K = _matrix(margins, "margins").shape[1]
    resp, w = _matrix(resp, "resp", K), _matrix(w, "w", K)
    merged = merged_experts(margins, agree=agree, min_corr=min_corr, min_pairs=min_pairs)
    saturated = bool(merged) and K >= 2 and bool(gate_entropy(w) < entropy_frac * math.log(K))
    return {"merged": merged, "dead": dead_experts(resp, min_mass=min_mass), "saturated": saturated}


def collapse_metrics(margins: Tensor, resp: Tensor, w: Tensor, agree: float = 0.95, min_corr: float = 0.95,
                     min_pairs: int = 8, min_mass: float = 0.02, entropy_frac: float = 0.05) -> dict[str, float]:
    """Scalars to log: collapse/merged_pairs, collapse/dead_experts (counts), collapse/gate_saturated (0/1),
    collapse/min_resp_mass (min_k mean_i q_ik), collapse/max_margin_corr (max Pearson over pairs j < k; 0 when
    K = 1; not subject to min_pairs)."""
    report = collapse_report(margins, resp, w, agree=agree, min_corr=min_corr, min_pairs=min_pairs,
                             min_mass=min_mass, entropy_frac=entropy_frac)
    corr = margin_correlation(margins)
    K = corr.shape[0]
    j, k = torch.triu_indices(K, K, offset=1)
    return {
        "collapse/merged_pairs": float(len(report["merged"])),
        "collapse/dead_experts": float(len(report["dead"])),
        "collapse/gate_saturated": float(report["saturated"]),
        "collapse/min_resp_mass": float(_matrix(resp, "resp", K).mean(0).min()),
        "collapse/max_margin_corr": float(corr[j, k].max()) if K > 1 else 0.0,
    }


def split_source(resp: Tensor, exclude: int | Iterable[int] = ()) -> int:
    """The most loaded expert, argmax_k mean_i q_ik, skipping the experts in `exclude` (e.g. the dead ones)."""
    mass = _matrix(resp, "resp").mean(0)
    skip = [exclude] if isinstance(exclude, int) else list(exclude)
    if skip:
        mass = mass.clone()
        mass[skip] = -math.inf
    if not torch.isfinite(mass).any():
        raise ValueError("split_source: every expert is excluded")
    return int(mass.argmax())


def _check_pair(K: int, dead: int, source: int) -> None:
    if not (0 <= dead < K and 0 <= source < K):
        raise ValueError(f"dead={dead} and source={source} must be expert indices in [0, {K})")
    if dead == source:
        raise ValueError(f"dead and source must differ, got {dead} for both")


@torch.no_grad()
def split_expert(heads: Tensor | Sequence[Tensor], dead: int, source: int, noise: float,
                 generator: torch.Generator | None = None) -> None:
    """In place: expert `dead` ← expert `source` + ε, ε ~ N(0, (noise · std(source))²) elementwise.

    heads: one (K, …) tensor (e.g. the (K, V, H) LM heads; an nn.Parameter works) or a sequence of K same-shaped
    tensors, one per expert. std(source) is the std of all of the source expert's weights; noise = 0 is an exact
    copy. The noise is drawn in fp32 on the weights' device (pass a `generator` on that device for
    reproducibility) and cast to their dtype.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    K = heads.shape[0] if isinstance(heads, Tensor) else len(heads)
    _check_pair(K, dead, source)
    src, dst = heads[source], heads[dead]
    if src.shape != dst.shape:
        raise ValueError(f"expert {source} has shape {tuple(src.shape)}, expert {dead} {tuple(dst.shape)}")
    if noise == 0:
        dst.copy_(src)
        return
    src32 = src.float()
    std = noise * float(src32.std()) if src32.numel() > 1 else 0.0
    eps = torch.randn(src32.shape, generator=generator, device=src32.device, dtype=torch.float32)
    dst.copy_(src32 + std * eps)


@torch.no_grad()
def split_responsibility(log_w_or_w: Tensor, dead: int, source: int, log: bool | None = None) -> Tensor:
    """New Mix weights after re-seeding `dead` from `source`: w'_source = w'_dead = w_source / 2, the dead
    expert's own mass dropped, others kept, all renormalised. (K,) → (K,), in the input's space.

    log: whether the input is log w (the output is then log w'); None detects it (log if any entry < 0, since
    probabilities never are). Example: w = (0.7, 0.29, 0.01), dead = 2, source = 0 → (0.35, 0.29, 0.35) / 0.99.
    The floor (gate.w_min) is the caller's to apply.
    """
    x = torch.as_tensor(log_w_or_w).detach()
    if x.dim() != 1:
        raise ValueError(f"split_responsibility takes a (K,) vector, got shape {tuple(x.shape)}")
    _check_pair(x.shape[0], dead, source)
    if log is None:
        log = bool((x < 0).any())
    out = x.clone()
    if log:
        out[source] = out[dead] = x[source] - math.log(2.0)
        return out - torch.logsumexp(out, 0)
    out[source] = out[dead] = x[source] / 2
    return out / out.sum()


def posterior_information(log_w: Tensor, margins: Tensor) -> Tensor:
    """Mean over the pairs of KL(q_i ‖ w_i), q_i = softmax(log w_i + log σ(Δ_i)) the plain posterior (docs/math.md
    §12): the information, in nats, that the experts' likelihoods add to the gate. 0 while the experts are alike
    (equal margins give q = w), large when they disagree on a pair. log_w, margins (N, K) -> scalar, float64.
    """
    log_w, margins = _matrix(log_w, "log_w"), _matrix(margins, "margins")
    log_w = log_w.double().log_softmax(-1)
    log_q = (log_w + torch.nn.functional.logsigmoid(margins.double())).log_softmax(-1)
    return (log_q.exp() * (log_q - log_w)).sum(-1).mean()
