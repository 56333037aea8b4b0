"""`mixdpo generate`: decode from the mixture of an exported run (docs/ARCHITECTURE.md "Public surface").

    mixdpo generate --run runs/tiny --prompt "Human: hi\n\nAssistant:"                  # z ~ w(x), then π_z
    mixdpo generate --run runs/tiny --prompt "..." --route top1 --max-new-tokens 20     # argmax_k w(x)
    mixdpo generate --run runs/tiny --prompt "..." --expert 2 --greedy                  # a fixed expert

Exact mixture sampling: π_mix(y | x) = Σ_k w_k(x) π_k(y | x), so drawing z ~ Categorical(w(x)) and then
y ~ π_z(· | x) samples π_mix exactly (ancestral sampling). Each expert is the exported standalone
Hugging Face model, decoded with `generate`. A `moe` gate reads the hidden state of expert 0's trunk at
the last prompt token, as in training.
"""
from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def gate_weights(export: Path, input_ids: torch.Tensor, user: str | None = None) -> tuple[torch.Tensor, int]:
    """(w (K,), K) for one prompt (1, T) from the exported gate (uniform when the export has none)."""
    from mixdpo_ds.training.export import load_expert, load_export_gate

    gate, meta = load_export_gate(str(export))
    if gate is None:
        import json

        K = json.loads((export / "export.json").read_text())["num_experts"]
        return torch.full((K,), 1.0 / K), K
    feats = None
    if getattr(gate.cfg, "uses_prompt", False):
        trunk = load_expert(str(export), 0).base_model
        feats = trunk(input_ids=input_ids).last_hidden_state[:, -1].float()  # (1, H)
    user_id = (meta.get("user_vocab") or {}).get(str(user), -1) if user is not None else -1
    log_w = gate.eval()(feats, torch.tensor([user_id]), batch_size=1)  # (1, K)
    return log_w[0].exp(), gate.num_experts


@torch.no_grad()
def generate(run_dir: str, prompt: str, expert: int | None = None, route: str = "sample", max_new_tokens: int = 32,
             user: str | None = None, seed: int = 0, greedy: bool = False) -> dict:
    """Pick an expert (fixed, top-1 or sampled from w(x)) and decode `prompt` with it; returns a dict with
    `expert`, `route`, `w`, `completion`."""
    from transformers import AutoTokenizer

    from mixdpo_ds.training.export import load_expert

    if route not in ("sample", "top1"):
        raise ValueError(f"--route must be one of ['sample', 'top1'], got {route!r}")
    export = Path(run_dir) / "export"
    tokenizer = AutoTokenizer.from_pretrained(str(export / "expert_0"))
    enc = tokenizer(prompt, return_tensors="pt")  # with the tokenizer's own prefix (BOS), as data.py does
    w, K = gate_weights(export, enc["input_ids"], user)
    gen = torch.Generator().manual_seed(seed)
    if expert is not None:
        if not 0 <= expert < K:
            raise ValueError(f"--expert must be in [0, {K}), got {expert}")
        z, route = expert, "fixed"
    elif route == "top1":
        z = int(w.argmax())
    else:
        z = int(torch.multinomial(w, 1, generator=gen))
    model = load_expert(str(export), z)
    torch.manual_seed(seed)  # HF sampling draws from the global RNG
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id)
    completion = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return {"expert": z, "route": route, "w": w.tolist(), "prompt": prompt, "completion": completion}
