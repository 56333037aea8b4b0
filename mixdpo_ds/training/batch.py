"""The model batch (docs/ARCHITECTURE.md "Batch"): the deterministic, resumable order of the pairs (`batches`),
the collated tensors (`collate`; rows 0..B-1 chosen, B..2B-1 rejected; ranked items of m responses: rows j·B..(j+1)·B-1
the rank-j response, docs/math.md §15) and the views of them the trainer takes."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "prompt_last_index")  # what the policy's forward takes


def as_pairs(x: torch.Tensor, B: int) -> torch.Tensor:
    """(2B,) -> (B, 2) or (2B, K) -> (B, 2, K): rows 0..B-1 chosen, B..2B-1 rejected.

    Ranked items (m responses each, response-major: rows j·B..(j+1)·B-1 hold rank j): (mB,) -> (B, m) and
    (mB, K) -> (B, m, K); m = rows / B, so pairs are the m = 2 case exactly."""
    if x.shape[0] % B:
        raise ValueError(f"as_pairs: {x.shape[0]} rows are not a whole number of responses for {B} items")
    return x.view(x.shape[0] // B, B, *x.shape[1:]).transpose(0, 1)


def example_responses(ex: dict) -> list[list[int]]:
    """The token ids of an example's responses in ranked order: [chosen, rejected] for a pair, `response_ids`
    (m lists, best first) for a ranked item."""
    return ex["response_ids"] if "response_ids" in ex else [ex["chosen_ids"], ex["rejected_ids"]]


def model_inputs(batch: dict, device) -> dict:
    """The policy forward's keyword arguments of a collated batch, on `device`."""
    return {k: batch[k].to(device) for k in MODEL_KEYS}


def chosen_prompt_features(out, B: int) -> torch.Tensor | None:
    """(B, H) fp32 prompt features of the chosen rows (the rejected rows share the prompt), or None when the policy
    gives none: what the gate reads."""
    return out.prompt_features[:B].float() if out.prompt_features is not None else None


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B tokenised examples → the model batch (docs/ARCHITECTURE.md "Batch").

    input_ids, attention_mask, labels: (2B, T), T = longest prompt + response; rows 0..B-1 are
    prompt + chosen, rows B..2B-1 prompt + rejected, right-padded with `pad_token_id`; labels are the ids on
    response tokens and -100 on prompt and padding. prompt_last_index: (2B,) position of the last prompt
    token. user_ids, group_ids, index: (B,) long.
    Ranked items (m responses each, `response_ids`): (mB, T) rows, response-major: rows j·B..(j+1)·B-1 are
    prompt + the rank-j response (rank 0 best); m = 2 is the pair layout above, row for row.
    """
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id (set tokenizer.pad_token, e.g. to the eos token)")
    responses = [example_responses(ex) for ex in examples]
    sizes = sorted({len(r) for r in responses})
    if len(sizes) != 1:
        raise ValueError(f"collate: one batch needs one number of responses per item, got {sizes} (ranked data "
                         "must rank the same number of responses in every row)")
    pairs = [(ex["prompt_ids"], r[j]) for j in range(sizes[0]) for ex, r in zip(examples, responses, strict=True)]
    T = max(len(p) + len(y) for p, y in pairs)
    ids, mask, labels = [], [], []
    for p, y in pairs:
        pad = T - len(p) - len(y)
        ids.append(p + y + [pad_token_id] * pad)
        mask.append([1] * (len(p) + len(y)) + [0] * pad)
        labels.append([-100] * len(p) + y + [-100] * pad)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "prompt_last_index": torch.tensor([len(p) - 1 for p, _ in pairs], dtype=torch.long),
        "user_ids": torch.tensor([ex["user"] for ex in examples], dtype=torch.long),
        "group_ids": torch.tensor([ex["group"] for ex in examples], dtype=torch.long),
        "index": torch.tensor([ex["index"] for ex in examples], dtype=torch.long),
    }


def num_batches(n_examples: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Batches per epoch per rank that `batches` yields."""
    step = batch_size * world_size
    return n_examples // step if drop_last else -(-n_examples // step)


def batches(data: list[dict], batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
            world_size: int = 1, drop_last: bool = True) -> Iterator[list[dict]]:
    """Deterministic shuffled batches of `data` for one epoch, resumable: `start` skips that many batches.

    The permutation depends only on (seed, epoch, len(data)); global step s takes permutation positions
    [s·bs·W, (s+1)·bs·W) and rank r the r-th block of `batch_size` inside it, so every rank sees a distinct
    shard and resuming at step `start` continues exactly where an uninterrupted run would be.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"batches: need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, "
                         f"{rank}, {world_size}")
    if not drop_last and world_size > 1:
        raise ValueError("batches: drop_last=False would give ranks unequal batch counts; use drop_last=True")
    perm = np.random.default_rng([seed, epoch]).permutation(len(data))
    step = batch_size * world_size
    for s in range(start, num_batches(len(data), batch_size, world_size, drop_last)):
        lo = s * step + rank * batch_size
        yield [data[i] for i in perm[lo:lo + batch_size]]
