"""Random draws of one optimizer step, made for its global batch so that they do not depend on how the batch is
split into micro-batches and ranks (docs/math.md §9): each pair takes the row at its position in the step's
global batch.
"""
from __future__ import annotations

import torch

from mixdpo_ds.core.em import random_responsibilities
from mixdpo_ds.core.gumbel import sample_gumbel


def step_draws(N: int, K: int, em, warm: bool, alternate: bool, cpu_gen, dev_gen, device):
    """-> (warm-up q (N, K) or None, Gumbel noise (L, N, K) or None, the `alternate` gate step's own noise or None)
    for the N = grad_accum · micro_batch · world pairs of one optimizer step."""
    resp = random_responsibilities(N, K, em.dirichlet_alpha, cpu_gen, device) if warm else None
    noise = gate_noise = None
    if em.mode == "gumbel" and not warm:
        noise = sample_gumbel((em.gumbel.samples, N, K), generator=dev_gen, device=device)
        if alternate:
            gate_noise = sample_gumbel((em.gumbel.samples, N, K), generator=dev_gen, device=device)
    return resp, noise, gate_noise


def row_positions(micro: int, B: int, rank: int, world: int, device) -> torch.Tensor:
    """Positions of rank `rank`'s B pairs of micro-batch `micro` in the step's global batch (the order of
    `data.batches`): micro-batch j, rank r, row i is pair j·B·W + r·B + i."""
    return micro * B * world + rank * B + torch.arange(B, device=device)
