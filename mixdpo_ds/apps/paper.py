"""The paper's full-size recipe (§4, App. H) as stages, each a real code path (`launch/paper/README.md` runs them):

    prepare   reviews → rows {text, prompt, domain}: IMDb / Amazon book reviews from the hub, or a local jsonl
    sft       fine-tune a causal LM (GPT-2) on the review texts          (mixdpo_ds.apps.sft)
    sample    n completions per prompt from a model                       (mixdpo_ds.apps.sft.sample_responses)
    annotate  score every completion with reward functions: local rules or HF pipelines (`load_reward`)
    pairs     completions + scores → preference pairs with a latent annotator group per pair
    train     `mixdpo train` (Mix-DPO Case 1 / Case 2, MoE-DPO) — the trainer, unchanged
    evaluate  sample from every expert / the mixture of a run on test prompts, score with the rewards (Tables 1–3)

    python -m mixdpo_ds.apps.paper prepare --source imdb --split train --out data/imdb_train.jsonl
    python -m mixdpo_ds.apps.paper sft --model gpt2 --data data/imdb_train.jsonl --out runs/sft_gpt2 --steps 2000
    python -m mixdpo_ds.apps.paper sample --model runs/sft_gpt2 --data data/imdb_train.jsonl --out data/compl.jsonl
    python -m mixdpo_ds.apps.paper annotate --data data/compl.jsonl --out data/scored.jsonl \
        --reward sentiment=hf:text-classification:lvwerra/distilbert-imdb:POSITIVE ...
    python -m mixdpo_ds.apps.paper pairs --data data/scored.jsonl --out data/pairs.jsonl --groups sentiment,info,grammar
    python -m mixdpo_ds.apps.paper evaluate --run runs/mix_case1 --data data/imdb_test.jsonl --reward ... --out t1.json

The tests (tests/integration/test_paper_recipe.py) run every stage on tiny local stand-ins.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable

import numpy as np

from mixdpo_ds.apps.datasets.annotators import ANNOTATORS
from mixdpo_ds.apps.datasets.reviews import read_jsonl, write_jsonl

Reward = Callable[[str, str], float]
HUB_SOURCES = {"imdb": ("stanfordnlp/imdb", "text", "movie"),
               "amazon_books": ("McAuley-Lab/Amazon-Reviews-2023", "text", "book")}


# ------------------------------------------------------------------------------------------------ prepare
def prompt_of(text: str, n_words: int) -> str:
    """The first n_words words of a review (the paper's IMDb prompts are review prefixes)."""
    return " ".join(text.replace("<br />", " ").split()[:n_words])


def prepare(source: str, out: str, split: str = "train", n_words: int = 8, max_rows: int | None = None,
            domain: str | None = None, seed: int = 0) -> str:
    """Rows {text, prompt, domain} from a hub source name in HUB_SOURCES or a local jsonl with a `text` field."""
    if source in HUB_SOURCES:
        import datasets

        name, column, dom = HUB_SOURCES[source]
        kwargs = {"name": "raw_review_Books", "trust_remote_code": True} if source == "amazon_books" else {}
        ds = datasets.load_dataset(name, split="full" if source == "amazon_books" else split, **kwargs)
        texts = ds[column]
    else:
        texts, dom = [r["text"] for r in read_jsonl(source)], domain or "movie"
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))[:max_rows] if max_rows else np.arange(len(texts))
    rows = [{"text": texts[i], "prompt": prompt_of(texts[i], n_words), "domain": domain or dom} for i in order]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return write_jsonl([r for r in rows if r["prompt"]], out)


# ------------------------------------------------------------------------------------------------ sft, sample
def sft(model: str, data: str, out: str, steps: int, batch_size: int = 16, lr: float = 5e-5, max_length: int = 128,
        seed: int = 0) -> str:
    """Fine-tune `model` (hub name or dir) on the `text` of every row; save model + tokenizer to out."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixdpo_ds.apps.sft import SFTConfig, sft_train

    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model)
    if torch.cuda.is_available():
        lm = lm.cuda()
    rows = [{"prompt": "", "response": r["text"]} for r in read_jsonl(data)]
    sft_train(lm, tok, rows, SFTConfig(steps=steps, batch_size=batch_size, lr=lr, max_length=max_length, seed=seed,
                                       log_every=max(1, steps // 10)),
              progress=lambda s, loss: print(f"sft step {s}/{steps} loss {loss:.4f}", flush=True))
    lm.cpu().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sample(model: str, data: str, out: str, n: int = 2, max_new_tokens: int = 48, seed: int = 0,
           max_prompts: int | None = None) -> str:
    """n completions per prompt of the rows in `data`: rows {prompt, domain, responses: [n strings]}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixdpo_ds.apps.sft import sample_responses

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model).eval()
    if torch.cuda.is_available():
        lm = lm.cuda()
    rows = read_jsonl(data)[:max_prompts]
    prompts = [r["prompt"] for r in rows]
    draws = [sample_responses(lm, tok, prompts, max_new_tokens=max_new_tokens, seed=seed + j) for j in range(n)]
    out_rows = [{"prompt": r["prompt"], "domain": r.get("domain", "movie"), "responses": [d[i] for d in draws]}
                for i, r in enumerate(rows)]
    return write_jsonl(out_rows, out)


# ------------------------------------------------------------------------------------------------ rewards
def load_reward(spec: str) -> Reward:
    """A reward callable `reward(prompt, response) -> float` from a spec:

    - `local:NAME`: a rule of mixdpo_ds.apps.datasets.annotators (sentiment, informativeness, grammar);
    - `hf:TASK:MODEL[:LABEL]`: a Hugging Face pipeline (e.g. `hf:text-classification:lvwerra/distilbert-imdb:POSITIVE`,
      `hf:text-classification:textattack/roberta-base-CoLA:LABEL_1`); the reward is the probability of LABEL
      (default: the first label of the model config) for prompt + response.
    """
    kind, _, rest = spec.partition(":")
    if kind == "local":
        if rest not in ANNOTATORS:
            raise ValueError(f"reward {spec!r}: local rewards are {sorted(ANNOTATORS)}")
        return ANNOTATORS[rest]
    if kind == "hf":
        task, _, rest = rest.partition(":")
        model, _, label = rest.partition(":")
        return _hf_reward(task, model, label or None)
    raise ValueError(f"reward spec {spec!r} must start with 'local:' or 'hf:'")


def _hf_reward(task: str, model: str, label: str | None) -> Reward:
    from transformers import pipeline

    pipe = pipeline(task, model=model, top_k=None, truncation=True)
    label = label or pipe.model.config.id2label[0]

    def reward(prompt: str, response: str) -> float:
        scores = pipe(f"{prompt} {response}".strip())
        scores = scores[0] if scores and isinstance(scores[0], list) else scores
        return float(next(s["score"] for s in scores if s["label"] == label))

    return reward


def parse_rewards(specs: list[str]) -> dict[str, Reward]:
    """["name=spec", ...] → {name: reward}."""
    out = {}
    for item in specs:
        name, _, spec = item.partition("=")
        if not spec:
            raise ValueError(f"--reward {item!r} must be NAME=SPEC (e.g. sentiment=local:sentiment)")
        out[name] = load_reward(spec)
    return out


def annotate(data: str, out: str, rewards: dict[str, Reward]) -> str:
    """Add `scores` {name: [score per response]} to every completion row."""
    rows = read_jsonl(data)
    for r in rows:
        r["scores"] = {name: [f(r["prompt"], y) for y in r["responses"]] for name, f in rewards.items()}
    return write_jsonl(rows, out)


# ------------------------------------------------------------------------------------------------ pairs
def build_pairs(data: str, out: str, groups: list[str] | None = None, by_domain: dict[str, str] | None = None,
                temperature: float = 0.0, users_per_group: int = 1, seed: int = 0) -> str:
    """Scored completions → pairs {prompt, chosen, rejected, group, user, domain}.

    Multi-reward (Case 1/2): each pair's annotator group is drawn uniformly from `groups`. Contextual (MoE-DPO):
    `by_domain` maps the row's domain to the group (= reward name). The label is Bradley–Terry with the group's
    score (temperature 0: the higher score wins; ties are dropped)."""
    from mixdpo_ds.apps.datasets.reviews import bt_probability

    rng = np.random.default_rng(seed)
    pairs = []
    for r in read_jsonl(data):
        a, b = r["responses"][:2]
        group = by_domain[r["domain"]] if by_domain else groups[int(rng.integers(len(groups)))]
        sa, sb = r["scores"][group][:2]
        if a == b or (temperature == 0 and sa == sb) or not a.strip() or not b.strip():
            continue
        chosen, rejected = (a, b) if rng.random() < bt_probability(sa, sb, temperature) else (b, a)
        pairs.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected, "group": group,
                      "user": f"{group}_{int(rng.integers(users_per_group))}", "domain": r.get("domain")})
    return write_jsonl(pairs, out)


# ------------------------------------------------------------------------------------------------ train, evaluate
def train(config: str, overrides: list[str]) -> int:
    from mixdpo_ds.cli import main as cli_main

    return cli_main(["train", "--config", config, *overrides])


def evaluate(run: str, data: str, out: str, rewards: dict[str, Reward], max_prompts: int | None = None,
             max_new_tokens: int = 48, seed: int = 0, by_domain: dict[str, str] | None = None) -> dict:
    """Mean reward (± standard error, as the paper's tables) of samples from each expert and from the mixture
    (z ~ w(x) for a global gate; per-prompt weights for an MoE gate) on the prompts of `data`. With `by_domain`
    (Table 2) each prompt is scored only by its domain's reward: columns "DOMAIN (REWARD)"."""
    import torch
    from transformers import AutoTokenizer

    from mixdpo_ds.apps.sft import sample_responses
    from mixdpo_ds.training.export import load_expert, load_export_gate

    export = os.path.join(run, "export")
    K = json.load(open(os.path.join(export, "export.json")))["num_experts"]
    tok = AutoTokenizer.from_pretrained(os.path.join(export, "expert_0"))
    rows = read_jsonl(data)[:max_prompts]
    prompts = [r["prompt"] for r in rows]
    samples = {f"expert {k}": sample_responses(load_expert(export, k), tok, prompts, max_new_tokens, seed + k)
               for k in range(K)}
    gate, _ = load_export_gate(export)
    w = np.full((len(prompts), K), 1.0 / K)
    if gate is not None:
        trunk = load_expert(export, 0).base_model
        with torch.no_grad():
            for i, p in enumerate(prompts):
                ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
                feats = trunk(input_ids=ids).last_hidden_state[:, -1].float() if gate.cfg.uses_prompt else None
                w[i] = gate.eval()(feats, torch.tensor([-1]), batch_size=1)[0].exp().numpy()
    rng = np.random.default_rng(seed)
    z = [rng.choice(K, p=wi / wi.sum()) for wi in w]
    samples["mixture"] = [samples[f"expert {k}"][i] for i, k in enumerate(z)]
    columns = {rname: (f, None) for rname, f in rewards.items()} if not by_domain else \
        {f"{dom} ({rname})": (rewards[rname], dom) for dom, rname in by_domain.items()}
    table = {}
    for name, ys in samples.items():
        table[name] = {}
        for col, (f, dom) in columns.items():
            vals = np.array([f(p, y) for p, y, r in zip(prompts, ys, rows, strict=True)
                             if dom is None or r.get("domain") == dom])
            table[name][col] = {"mean": float(vals.mean()) if len(vals) else float("nan"),
                                "se": float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else 0.0}
    with open(out, "w") as f:
        json.dump({"run": run, "n_prompts": len(prompts), "table": table}, f, indent=1)
    return table


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixdpo_ds.apps.paper", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    s = sub.add_parser("prepare")
    s.add_argument("--source", required=True, help=f"{sorted(HUB_SOURCES)} or a local jsonl with `text`")
    s.add_argument("--out", required=True)
    s.add_argument("--split", default="train")
    s.add_argument("--n-words", type=int, default=8)
    s.add_argument("--max-rows", type=int, default=None)
    s.add_argument("--domain", default=None)
    s = sub.add_parser("sft")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--lr", type=float, default=5e-5)
    s.add_argument("--max-length", type=int, default=128)
    for name in ("sample", "evaluate"):
        s = sub.add_parser(name)
        s.add_argument("--model" if name == "sample" else "--run", required=True)
        s.add_argument("--data", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--max-prompts", type=int, default=None)
        s.add_argument("--max-new-tokens", type=int, default=48)
        if name == "sample":
            s.add_argument("--n", type=int, default=2)
        else:
            s.add_argument("--reward", action="append", required=True, help="NAME=SPEC, see load_reward")
            s.add_argument("--by-domain", default=None, help="domain=reward,...: score each prompt by its domain")
    s = sub.add_parser("annotate")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--reward", action="append", required=True, help="NAME=SPEC (local:sentiment, hf:TASK:MODEL:LABEL)")
    s = sub.add_parser("pairs")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--groups", default=None, help="comma-separated reward names (multi-reward task)")
    s.add_argument("--by-domain", default=None, help="domain=reward,... (contextual task)")
    s.add_argument("--temperature", type=float, default=0.0)
    s = sub.add_parser("train")
    s.add_argument("--config", required=True)
    s.add_argument("overrides", nargs="*")
    return p


def _pairs_arg(text: str | None) -> dict[str, str] | None:
    """"movie=a,book=b" → {"movie": "a", "book": "b"}."""
    return dict(kv.split("=", 1) for kv in text.split(",")) if text else None


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.stage == "prepare":
        print(prepare(a.source, a.out, a.split, a.n_words, a.max_rows, a.domain))
    elif a.stage == "sft":
        print(sft(a.model, a.data, a.out, a.steps, a.batch_size, a.lr, a.max_length))
    elif a.stage == "sample":
        print(sample(a.model, a.data, a.out, a.n, a.max_new_tokens, max_prompts=a.max_prompts))
    elif a.stage == "annotate":
        print(annotate(a.data, a.out, parse_rewards(a.reward)))
    elif a.stage == "pairs":
        by_domain = _pairs_arg(a.by_domain)
        groups = a.groups.split(",") if a.groups else None
        if not (by_domain or groups):
            raise SystemExit("pairs: give --groups (multi-reward) or --by-domain (contextual)")
        print(build_pairs(a.data, a.out, groups, by_domain, a.temperature))
    elif a.stage == "train":
        return train(a.config, a.overrides)
    else:
        print(json.dumps(evaluate(a.run, a.data, a.out, parse_rewards(a.reward), a.max_prompts, a.max_new_tokens,
                                  by_domain=_pairs_arg(a.by_domain)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
