"""The model batch's layout (docs/ARCHITECTURE.md "Batch"): rows 0..B-1 chosen, B..2B-1 rejected."""
from __future__ import annotations

import torch

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "prompt_last_index")  # what the policy's forward takes


def as_pairs(x: torch.Tensor, B: int) -> torch.Tensor:
    """(2B,) -> (B, 2) or (2B, K) -> (B, 2, K): rows 0..B-1 chosen, B..2B-1 rejected."""
    return x.view(2, B, *x.shape[1:]).transpose(0, 1)


def model_inputs(batch: dict, device) -> dict:
    """The policy forward's keyword arguments of a collated batch, on `device`."""
    return {k: batch[k].to(device) for k in MODEL_KEYS}


def chosen_prompt_features(out, B: int) -> torch.Tensor | None:
    """(B, H) fp32 prompt features of the chosen rows (the rejected rows share the prompt), or None when the policy
    gives none: what the gate reads."""
    return out.prompt_features[:B].float() if out.prompt_features is not None else None
