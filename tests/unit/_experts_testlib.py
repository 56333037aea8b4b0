"""Helpers shared by the experts / reference / export tests: random tokenised pairs and a hand-written
sequence log-prob (full logits, log_softmax, gather, per-row sum) to check `sequence_logps` against."""
from __future__ import annotations

import torch

from mixdpo_ds.training.batch import collate

PAD_ID = 0


def make_examples(n: int, seed: int = 0, vocab: tuple[int, int] = (3, 300), indices: list[int] | None = None):
    """n tokenised pairs of random lengths (prompt 2-6, responses 1-7 tokens), as `batch.collate` expects."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(vocab[0], vocab[1], (length,), generator=g).tolist()

    indices = list(range(n)) if indices is None else indices
    return [{"prompt_ids": ids(2, 6), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7), "index": i,
             "user": i % 3, "group": -1} for i in indices]


def make_batch(n: int = 3, seed: int = 0) -> dict:
    return collate(make_examples(n, seed), PAD_ID)


@torch.no_grad()
def hf_sequence_logps(model, batch: dict) -> torch.Tensor:
    """(2B,) Σ over response tokens of log_softmax(logits[t])[labels[t + 1]], from the plain HF forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logps = logits[:, :-1].log_softmax(-1)                                     # (2B, T-1, V)
    targets = batch["labels"][:, 1:]                                           # (2B, T-1)
    mask = targets != -100
    token = logps.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)   # (2B, T-1)
    return (token * mask).sum(1).float()


def policy_logps(policy, batch: dict):
    return policy(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prompt_last_index"])
