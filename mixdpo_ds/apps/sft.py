"""Supervised fine-tuning (SFT): the warm-up that makes the base/reference policy a sensible language model.

A plain PyTorch loop (AdamW, causal-LM loss) over prompt + response rows, as the paper's first stage (GPT-2
fine-tuned on IMDb, §4.1) and the demo's warm-up of a tiny GPT-2 built from a config. It runs on one device;
for the paper's GPT-2 (124M) on IMDb one GPU is plenty, so DeepSpeed is not needed here.

    # one CPU (the demo's warm-up):
    from mixdpo_ds.apps.sft import SFTConfig, build_tiny_base, sft_train
    # paper recipe, one GPU:
    python -m mixdpo_ds.apps.paper sft --model gpt2 --data imdb_train.jsonl --out runs/sft_gpt2
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger("mixdpo_ds")


@dataclass
class SFTConfig:
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "rows per step"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW peak learning rate (cosine decay to 10%)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_length: int = field(default=32, metadata={"help": "tokens per row (prompt + response + eos), truncated"})
    response_only: bool = field(default=False, metadata={
        "help": "loss on response tokens only; default: the whole text (the paper fine-tunes on full reviews)"})
    seed: int = field(default=0, metadata={"help": "seed of the row order"})
    log_every: int = field(default=50, metadata={"help": "steps between progress lines"})

    def __post_init__(self):
        for key in ("steps", "batch_size", "max_length", "log_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"sft.{key} must be >= 1, got {getattr(self, key)!r}")
        if not self.lr > 0:
            raise ValueError(f"sft.lr must be > 0, got {self.lr!r}")


def encode_rows(rows: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], int]]:
    """Rows {"prompt", "response"} → (ids, n_prompt): prompt and response tokenised separately (as data.py does,
    so SFT sees the same token boundary as DPO), eos appended, truncated to max_length keeping the prompt."""
    out = []
    eos = tokenizer.eos_token_id
    for row in rows:
        p = tokenizer(row.get("prompt", ""), add_special_tokens=False)["input_ids"] if row.get("prompt") else []
        r = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (p + r)[:max_length]
        if len(ids) >= 2:
            out.append((ids, min(len(p), len(ids))))
    return out


def collate_lm(encoded: list[tuple[list[int], int]], pad_id: int, response_only: bool) -> dict[str, torch.Tensor]:
    """(ids, n_prompt) list → input_ids, attention_mask, labels (B, T); labels -100 on padding (and on the prompt
    with response_only). Example: ids [5, 6, 7], n_prompt 1, T 4, response_only → labels [-100, 6, 7, -100]."""
    T = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), T), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
        labels[i, :len(ids)] = torch.tensor(ids)
        if response_only:
            labels[i, :n_prompt] = -100
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def sft_train(model, tokenizer, rows: list[dict], cfg: SFTConfig, progress=None) -> list[float]:
    """Train `model` (a HF causal LM, in place) on rows; returns the loss of every step.

    `progress(step, loss)` is called every cfg.log_every steps (the demo prints there)."""
    encoded = encode_rows(rows, tokenizer, cfg.max_length)
    if not encoded:
        raise ValueError("sft: no usable rows (each needs a non-empty response)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    rng = np.random.default_rng(cfg.seed)
    order, pos, losses = rng.permutation(len(encoded)), 0, []
    model.train()
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = rng.permutation(len(encoded)), 0
        batch = collate_lm([encoded[i] for i in order[pos:pos + cfg.batch_size]], pad, cfg.response_only)
        pos += cfg.batch_size
        out = model(**{k: v.to(device) for k, v in batch.items()})
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
        if progress is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            progress(step + 1, losses[-1])
    model.eval()
    return losses


def build_tiny_base(out_dir: str, tokenizer, rows: list[dict], cfg: SFTConfig, n_layer: int = 2, n_embd: int = 64,
                    n_head: int = 2, n_positions: int = 64, seed: int = 0, progress=None) -> tuple[str, list[float]]:
    """Build a seeded tiny GPT-2 over `tokenizer`'s vocabulary, SFT it on rows and save model + tokenizer to
    out_dir (a complete `from_pretrained` directory). Returns (out_dir, losses)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    t0 = time.perf_counter()
    losses = sft_train(model, tokenizer, rows, cfg, progress)
    log.info("sft: %d steps in %.1fs, loss %.3f -> %.3f", cfg.steps, time.perf_counter() - t0, losses[0], losses[-1])
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, losses


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, seed: int = 0,
                     batch_size: int = 128, greedy: bool = False, stop_tokens: tuple[str, ...] = (),
                     temperature: float = 1.0) -> list[str]:
    """Sample one response per prompt (softmax(logits / temperature), no top-k/top-p) and decode it without special
    tokens.

    A sample ends at end-of-sequence (dropped), at the first of `stop_tokens` (kept, like a stop string of
    `generate`) or after max_new_tokens. Prompts are grouped by token length so no batch needs padding (GPT-2 has
    no left-padding positions)."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if not temperature > 0:
        raise ValueError(f"sample_responses: temperature must be > 0 (greedy=True for argmax), got {temperature}")
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens]
    unknown = [t for t, i in zip(stop_tokens, stop_ids, strict=True) if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise ValueError(f"sample_responses: stop tokens {unknown} are not in the tokenizer's vocabulary")
    stop = torch.tensor(stop_ids, dtype=torch.long)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out: list[str | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # transformers ≥ 5.x renamed the KV-cache argument and output `past_key_values` → `cache`
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model.eval()
    for length, idx in sorted(by_len.items()):
        for lo in range(0, len(idx), batch_size):
            chunk = idx[lo:lo + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            step_ids, past = ids, None
            for _ in range(max_new_tokens):
                res = model(input_ids=step_ids, use_cache=True, **({cache_kw: past} if past is not None else {}))
                logits, past = res.logits[:, -1].float(), res[cache_kw]
                if greedy:
                    nxt = logits.argmax(-1)
                else:
                    probs = torch.softmax(logits / temperature, -1).cpu()
                    nxt = torch.multinomial(probs, 1, generator=gen)[:, 0].to(device)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                ids, step_ids = torch.cat([ids, nxt[:, None]], 1), nxt[:, None]
                done |= (nxt == eos) | torch.isin(nxt, stop.to(nxt.device))
                if bool(done.all()):
                    break
            for j, i in enumerate(chunk):
                new = ids[j, length:].tolist()
                ends = [j for j, t in enumerate(new) if t == eos or t in stop_ids]
                if ends:
                    new = new[:ends[0] + (new[ends[0]] != eos)]
                out[i] = tokenizer.decode(new, skip_special_tokens=True)
    return out
