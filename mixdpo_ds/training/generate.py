"""`mixdpo generate`: decode from the mixture of an exported run (docs/ARCHITECTURE.md "Public surface").

    mixdpo generate --run runs/tiny --prompt "Human: hi\n\nAssistant:"                  # z ~ w(x), then π_z
    mixdpo generate --run runs/tiny --prompt "..." --route top1 --max-new-tokens 20     # argmax_k w(x)
    mixdpo generate --run runs/tiny --prompt "..." --expert 2 --greedy                  # a fixed expert

Exact mixture sampling: π_mix(y | x) = Σ_k w_k(x) π_k(y | x), so drawing z ~ Categorical(w(x)) and then
y ~ π_z(· | x) samples π_mix exactly (ancestral sampling). Each expert is the exported standalone
Hugging Face model (from a compact-only export: the trunk + head z as one causal LM), decoded with `generate`.
A `moe` gate reads the hidden state of expert 0's trunk at the last prompt token, as in training.

A prompt longer than the model's positions minus --max-new-tokens keeps its last tokens (after the tokenizer's
own prefix, e.g. BOS), as training truncates prompts, with a warning; an empty prompt is an error. A --user in the
run's user-weight store (`mixdpo personalize`, DIR/user_weights.json) is routed with its personalised weights
(docs/math.md §13.1), whatever the gate. Otherwise a user-conditioned gate needs a --user of the training data (an
unknown one is an error naming some known ids); without --user it is routed by the population prior, the mean of
the training users' gate weights (docs/math.md §13.5).
A gate on user features (`gate.features=…user_features`) routes a new user from --user-features '{"column": value}'.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def gate_weights(export: Path, input_ids: torch.Tensor, user: str | None = None,
                 user_features: dict | None = None) -> tuple[torch.Tensor, int]:
    """(w (K,), K) for one prompt (1, T) from the exported gate (uniform when the export has none). A gate on user
    features routes by `user_features` (column → value) when given, else by --user's row of the training users."""
    from mixdpo_ds.training.export import load_export_gate, load_trunk

    gate, meta = load_export_gate(str(export))
    if gate is None:
        import json

        K = json.loads((export / "export.json").read_text())["num_experts"]
        return torch.full((K,), 1.0 / K), K
    feats = None
    if getattr(gate.cfg, "uses_prompt", False):
        trunk = load_trunk(str(export))
        feats = trunk(input_ids=input_ids).last_hidden_state[:, -1].float()  # (1, H)
    if user_features is not None and getattr(gate.cfg, "uses_user_features", False):
        log_w = gate.eval()(feats, torch.tensor([-1]), batch_size=1,
                            user_features=gate.user_features.encode([user_features]))  # (1, K)
        return log_w[0].exp(), gate.num_experts
    if user_features is not None:
        log.warning("--user-features is ignored: the run's gate (gate.features=%s) does not route by user features",
                    gate.cfg.features)
    user_id = _user_id(gate, meta, user)
    if user_id < 0 and getattr(gate, "has_population_prior", False):
        log_w = gate.eval().population_log_w(feats, batch_size=1)  # no --user: the mean of the training users
    else:
        log_w = gate.eval()(feats, torch.tensor([user_id]), batch_size=1)  # (1, K)
    return log_w[0].exp(), gate.num_experts


def stored_user_weights(run_dir: str, user: str | None) -> torch.Tensor | None:
    """w (K,) of --user from the run's user-weight store (`mixdpo personalize`), or None when it has none."""
    from mixdpo_ds.training.personalize import load_user_store

    if user is None:
        return None
    entry = load_user_store(run_dir)["users"].get(str(user))
    if entry is None:
        return None
    log.info("--user %r: routing with the personalised weights of the run's user store (%d pairs)", user,
             entry.get("n_pairs", 0))
    return torch.tensor(entry["w"], dtype=torch.float32)


def _user_id(gate, meta: dict, user: str | None) -> int:
    """The gate's id of --user: -1 without one (the population prior for a user-id gate); an unknown user is an
    error."""
    if user is None:
        return -1
    if not getattr(gate.cfg, "uses_user", False):
        log.warning("--user %r is ignored: the run's gate (gate.kind=%s, gate.features=%s) does not route by user",
                    user, gate.cfg.kind, gate.cfg.features)
        return -1
    vocab = meta.get("user_vocab") or {}
    if str(user) not in vocab:
        known = ", ".join(repr(u) for u in list(vocab)[:5]) + (", …" if len(vocab) > 5 else "")
        have = f"its {len(vocab)} users include {known}" if vocab else "it had no user ids"
        raise ValueError(f"--user {user!r} is not a user of the run's training data ({have}); omit --user to route "
                         "by the population prior (the mean of the training users' weights), or `mixdpo personalize` "
                         "the user from a few of their labelled pairs")
    return vocab[str(user)]


def fit_prompt(input_ids: list[int], positions: int | None, max_new_tokens: int, keep_prefix: int = 0) -> list[int]:
    """The prompt ids that leave room for max_new_tokens within `positions`: the first keep_prefix ids (BOS) and
    the last ones (a warning says how many were dropped). An error when no prompt token would fit."""
    if positions is None or len(input_ids) + max_new_tokens <= positions:
        return input_ids
    room = positions - max_new_tokens
    if room <= keep_prefix:
        raise ValueError(f"--max-new-tokens={max_new_tokens} leaves no room for the prompt in the model's "
                         f"{positions} positions; lower --max-new-tokens")
    kept = input_ids[:keep_prefix] + input_ids[len(input_ids) - (room - keep_prefix):]
    log.warning("the prompt has %d tokens: kept its last %d (dropped %d from the left) so that prompt + "
                "--max-new-tokens=%d fit the model's %d positions", len(input_ids), room - keep_prefix,
                len(input_ids) - len(kept), max_new_tokens, positions)
    return kept


@torch.no_grad()
def generate(run_dir: str, prompt: str, expert: int | None = None, route: str = "sample", max_new_tokens: int = 32,
             user: str | None = None, seed: int = 0, greedy: bool = False, user_features: dict | None = None) -> dict:
    """Pick an expert (fixed, top-1 or sampled from w(x)) and decode `prompt` with it; returns a dict with
    `expert`, `route`, `w`, `completion`."""
    from transformers import AutoTokenizer

    from mixdpo_ds.training.data import model_positions
    from mixdpo_ds.training.data_rows import Encoder
    from mixdpo_ds.training.export import export_model_config, export_tokenizer_dir, load_expert, run_export_dir

    if route not in ("sample", "top1"):
        raise ValueError(f"--route must be one of ['sample', 'top1'], got {route!r}")
    if not prompt or not prompt.strip():
        raise ValueError("--prompt is empty: give the text to continue (e.g. 'Human: hi\\n\\nAssistant:')")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    export = run_export_dir(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(export_tokenizer_dir(export)))
    prefix = Encoder(tokenizer).prefix  # with the tokenizer's own prefix (BOS), as data.py does
    ids = tokenizer(prompt)["input_ids"]
    found = model_positions(export_model_config(export))
    ids = fit_prompt(list(ids), found[0] if found else None, max_new_tokens, keep_prefix=len(prefix))
    enc = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    stored = stored_user_weights(run_dir, user)
    w, K = (stored, stored.shape[0]) if stored is not None else \
        gate_weights(export, enc["input_ids"], user, user_features)
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
