"""The sampling half of `mixdpo demo` (paper Tables 1 and 2): samples from the SFT reference, DPO and every expert
on held-out prompts, scored by the annotators' reward functions, plus each model's P(end | complete review).

Mixture rows are ancestral samples: z ~ w(x) (or its argmax), then expert z's sample for that prompt.
"""
from __future__ import annotations

import numpy as np
import torch

from mixdpo_ds.apps.datasets.annotators import ANNOTATORS
from mixdpo_ds.apps.sft import sample_responses


def _score(prompts: list[str], responses: list[str]) -> dict[str, float]:
    return {name: float(np.mean([f(p, r) for p, r in zip(prompts, responses, strict=True)]))
            for name, f in ANNOTATORS.items()}


@torch.no_grad()
def end_probability(model, tokenizer, rows: list[dict]) -> float:
    """Mean P(end-of-sequence | prompt + a complete review) over held-out chosen responses that end in '.': how
    willing a model is to stop where the data stops (the SFT reference: about 0.98)."""
    texts = [f"{r['prompt']} {r['chosen']}" for r in rows if r["chosen"].endswith(".")]
    probs = []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        probs.append(float(model(input_ids=ids).logits[0, -1].float().softmax(-1)[tokenizer.eos_token_id]))
    return float(np.mean(probs)) if probs else float("nan")


def _sample(model, tokenizer, prompts: list[str], seed: int, rows: list[dict], ends: dict, name: str,
            num_end_probe: int, stop_at_period: bool) -> list[str]:
    ends[name] = end_probability(model, tokenizer, rows[:num_end_probe])
    return sample_responses(model, tokenizer, prompts, seed=seed, stop_tokens=(".",) if stop_at_period else ())


def _route(samples: list[list[str]], w: np.ndarray, rng: np.random.Generator, top1: bool = False) -> list[str]:
    """Ancestral mixture sampling from per-expert samples: z_i ~ w_i (or argmax), then expert z_i's sample."""
    z = w.argmax(1) if top1 else np.array([rng.choice(len(wi), p=wi / wi.sum()) for wi in w])
    return [samples[k][i] for i, k in enumerate(z)]


def sample_tables(seed: int, tokenizer, base_dir: str, runs: dict, test: dict, *, num_samples: int,
                  num_end_probe: int, stop_at_period: bool) -> dict:
    """Table 1 (multi: mean annotator rewards of samples) and Table 2 (contextual: each domain's own reward).

    num_samples held-out prompts per task; num_end_probe held-out reviews for P(end | review); stop_at_period:
    samples end at the first '.' (the demo's `DemoConfig` fields of the same names)."""
    from transformers import AutoModelForCausalLM

    from mixdpo_ds.training.export import load_expert

    rng = np.random.default_rng(seed)
    n = num_samples
    probe = {"num_end_probe": num_end_probe, "stop_at_period": stop_at_period}
    ref = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    out = {}
    for task, (dpo, mix, K) in {"multi": ("dpo_multi", "mixdpo", 3), "contextual": ("dpo_ctx", "moedpo", 2)}.items():
        rows = test[task][:n]
        prompts = [r["prompt"] for r in rows]
        w = np.array([r["w"] for r in sorted(runs[mix]["rows"], key=lambda r: r["index"])[:n]])
        ends = {}
        samples = {"reference (SFT)": _sample(ref, tokenizer, prompts, seed, rows, ends, "reference (SFT)", **probe),
                   "DPO": _sample(load_expert(runs[dpo]["export"], 0), tokenizer, prompts, seed, rows, ends, "DPO",
                                  **probe)}
        experts = [_sample(load_expert(runs[mix]["export"], k), tokenizer, prompts, seed + 17 * k, rows, ends,
                           f"expert {k}", **probe) for k in range(K)]
        for k in range(K):
            samples[f"expert {k}"] = experts[k]
        samples["mixture (z ~ w)"] = _route(experts, w, rng)
        if task == "contextual":
            samples["mixture (top-1 w)"] = _route(experts, w, rng, top1=True)
        if task == "multi":
            out[task] = {name: _score(prompts, resp) for name, resp in samples.items()}
        else:
            out[task] = {name: _domain_scores(rows, resp, test["contextual_rewards"]) for name, resp in samples.items()}
        out[task + "_examples"] = {name: resp[:3] for name, resp in samples.items()}
        out[task + "_end_probability"] = ends
        out[task + "_prompts"] = prompts[:3]
    return out


def _domain_scores(rows: list[dict], responses: list[str], rewards: dict) -> dict[str, float]:
    """Contextual task: each prompt scored by its own domain's annotator reward (paper Table 2)."""
    out = {}
    for domain, name in rewards.items():
        vals = [ANNOTATORS[name](r["prompt"], y) for r, y in zip(rows, responses, strict=True) if r["domain"] == domain]
        out[f"{domain} ({name})"] = float(np.mean(vals)) if vals else float("nan")
    return out
