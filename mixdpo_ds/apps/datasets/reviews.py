"""Synthetic review-generation preference data with known latent annotator groups (paper §4, small and exact).

Two tasks, as in the paper:
- `multi` (§4.1, Mix-DPO): prompts "review of <movie> :"; every pair is labelled by one annotator group drawn
  independently of the prompt and the responses: `sentiment`, `informativeness` or `grammar` annotators (the rules of
  `annotators.py`). The group is latent: nothing in (x, y+, y−) but the label depends on it.
- `contextual` (§4.2, MoE-DPO): prompts "movie review of <title> :" or "book review of <title> :"; movie pairs are
  labelled by sentiment annotators, book pairs by informativeness annotators (`contextual_rewards`). The group is a
  function of the prompt's domain word, and of the `user` id.

A response is 1–3 clauses "the <noun> <be> [intensifier] <adjective>" joined by "and"/"but" and a final ".", with
seeded grammar corruptions (agreement errors, a dropped subject word, a repeated word, a missing period). Both
responses of a pair are drawn from this base distribution, which is also the SFT corpus; with `drop_ties` (default)
the second is redrawn while the labelling group's reward ties them. Labels follow Bradley–Terry with the group's
reward: P(a ≻ b) = sigmoid((r_g(x, a) − r_g(x, b)) / temperature); a kept tie (drop_ties=False) is a fair coin.

Rows: `prompt`, `chosen`, `rejected`, `group` (annotator group name), `user` (annotator id, e.g. "grammar_2"),
`domain`. Same seed → byte-identical files.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from mixdpo_ds.apps.datasets import vocab
from mixdpo_ds.apps.datasets.annotators import ANNOTATORS

TASKS = ("multi", "contextual")


@dataclass
class ReviewsConfig:
    task: str = field(default="multi", metadata={"help": "multi (3 annotator groups, Mix-DPO) | contextual (domains)"})
    num_train: int = field(default=2000, metadata={"help": "training pairs"})
    num_test: int = field(default=500, metadata={"help": "held-out pairs (evaluation, ceilings, sampling prompts)"})
    num_sft: int = field(default=2000, metadata={"help": "prompt+response rows of the SFT corpus"})
    temperature: float = field(default=0.05, metadata={"help": "Bradley-Terry label noise; 0 = deterministic"})
    users_per_group: int = field(default=3, metadata={"help": "annotator ids per group (the `user` column)"})
    p_error: float = field(default=0.2, metadata={"help": "per-clause probability of a subject-verb agreement error"})
    p_repeat: float = field(default=0.15, metadata={"help": "probability of one repeated word"})
    p_no_period: float = field(default=0.2, metadata={"help": "probability of a missing final period"})
    p_missing_subject: float = field(default=0.1, metadata={
        "help": "per-clause probability that the subject's head word is dropped ('the is good', 'but was dull'): "
                "the grammar rule's 'copula without a noun' error, which model samples drift into"})
    drop_ties: bool = field(default=True, metadata={
        "help": "redraw the rejected side while the labelling group's reward ties (annotators skip pairs they are "
                "indifferent about, as binarised preference sets drop ties); False keeps ties as coin flips"})
    contextual_rewards: dict = field(
        default_factory=lambda: {"movie": "sentiment", "book": "informativeness"},
        metadata={"help": "contextual task: domain -> annotator reward name"},
    )
    seed: int = field(default=0, metadata={"help": "one seed for everything: same seed, same files"})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"reviews.task must be one of {list(TASKS)}, got {self.task!r}")
        for key in ("num_train", "num_test", "num_sft", "users_per_group"):
            if getattr(self, key) < 1:
                raise ValueError(f"reviews.{key} must be >= 1, got {getattr(self, key)}")
        if self.temperature < 0:
            raise ValueError(f"reviews.temperature must be >= 0, got {self.temperature}")
        for key in ("p_error", "p_repeat", "p_no_period", "p_missing_subject"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"reviews.{key} must be in [0, 1], got {getattr(self, key)}")
        for domain, name in self.contextual_rewards.items():
            if domain not in vocab.DOMAINS or name not in ANNOTATORS:
                raise ValueError(
                    f"reviews.contextual_rewards maps a domain in {list(vocab.DOMAINS)} to a reward in "
                    f"{list(ANNOTATORS)}, got {domain!r}: {name!r}"
                )

    def groups(self) -> list[str]:
        """Group names in a fixed order (the order of ceilings and disagreement matrices)."""
        return list(ANNOTATORS) if self.task == "multi" else list(vocab.DOMAINS)

    def group_reward_name(self, group: str) -> str:
        return group if self.task == "multi" else self.contextual_rewards[group]


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def make_prompt(rng: np.random.Generator, task: str, domain: str) -> str:
    titles = vocab.MOVIE_TITLES if domain == "movie" else vocab.BOOK_TITLES
    title = _pick(rng, titles)
    return f"review of {title} :" if task == "multi" else f"{domain} review of {title} :"


def _clause(rng: np.random.Generator, cfg: ReviewsConfig) -> list[str]:
    if rng.random() < 0.6:
        nouns = vocab.SINGULAR_NOUNS + vocab.PLURAL_NOUNS
        noun = _pick(rng, nouns)
        subject, number = ["the", noun], ("plural" if noun in vocab.PLURAL_NOUNS else "singular")
    else:
        subject, number = [_pick(rng, vocab.VAGUE_SUBJECTS)], "singular"
    if rng.random() < cfg.p_error:
        number = "plural" if number == "singular" else "singular"
    if rng.random() < cfg.p_missing_subject:
        subject = subject[:-1]  # "the plot" -> "the", "it" -> nothing
    be = (vocab.BE_PRESENT if rng.random() < 0.5 else vocab.BE_PAST)[number]
    words = [*subject, be]
    if rng.random() < 0.3:
        words.append(_pick(rng, vocab.INTENSIFIERS))
    u = rng.random()
    adjectives = vocab.POSITIVE_ADJ if u < 0.4 else vocab.NEGATIVE_ADJ if u < 0.75 else sorted(vocab.NEUTRAL_ADJ)
    words.append(_pick(rng, adjectives))
    return words


def make_response(rng: np.random.Generator, cfg: ReviewsConfig) -> str:
    """One response from the base distribution (the SFT corpus and both sides of every pair)."""
    n_clauses = 1 + int(rng.choice(3, p=[0.3, 0.45, 0.25]))
    words = _clause(rng, cfg)
    for _ in range(n_clauses - 1):
        words += [_pick(rng, vocab.CONNECTORS), *_clause(rng, cfg)]
    if rng.random() < cfg.p_repeat:
        i = int(rng.integers(len(words)))
        words.insert(i, words[i])
    if rng.random() >= cfg.p_no_period:
        words.append(".")
    return " ".join(words)


def bt_probability(r_a: float, r_b: float, temperature: float) -> float:
    """P(a ≻ b) = sigmoid((r_a − r_b) / temperature); temperature 0 → 1, 0 or 0.5 (tie).

    Example: r_a = 0.6, r_b = 0.5, temperature 0.05 → sigmoid(2) = 0.8808.
    """
    diff = r_a - r_b
    if temperature == 0 or diff == 0:
        return 0.5 if diff == 0 else float(diff > 0)
    return 1.0 / (1.0 + math.exp(-diff / temperature))


_MAX_REDRAWS = 1000


def _group_and_domain(rng: np.random.Generator, cfg: ReviewsConfig) -> tuple[str, str]:
    if cfg.task == "multi":
        return _pick(rng, cfg.groups()), "movie"
    domain = _pick(rng, vocab.DOMAINS)
    return domain, domain


def make_pair(rng: np.random.Generator, cfg: ReviewsConfig) -> dict:
    """One labelled pair: the group is drawn first, independently of the prompt (multi) or as its domain; with
    `drop_ties` the rejected side is redrawn until the group's reward separates the two responses."""
    group, domain = _group_and_domain(rng, cfg)
    prompt = make_prompt(rng, cfg.task, domain)
    reward = ANNOTATORS[cfg.group_reward_name(group)]
    a = make_response(rng, cfg)
    r_a = reward(prompt, a)
    for _ in range(_MAX_REDRAWS):
        b = make_response(rng, cfg)
        r_b = reward(prompt, b)
        if b != a and not (cfg.drop_ties and r_b == r_a):
            break
    else:
        raise RuntimeError(f"no non-tied response for {a!r} under {cfg.group_reward_name(group)} after "
                           f"{_MAX_REDRAWS} draws")
    p = bt_probability(r_a, r_b, cfg.temperature)
    chosen, rejected = (a, b) if rng.random() < p else (b, a)
    user = f"{group}_{int(rng.integers(cfg.users_per_group))}"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "group": group, "user": user, "domain": domain}


def make_sft_row(rng: np.random.Generator, cfg: ReviewsConfig) -> dict:
    _, domain = _group_and_domain(rng, cfg)
    return {"prompt": make_prompt(rng, cfg.task, domain), "response": make_response(rng, cfg), "domain": domain}


def generate(cfg: ReviewsConfig) -> dict[str, list[dict]]:
    """All splits from one seeded stream per split: {"train", "test", "sft"} lists of rows."""
    streams = np.random.SeedSequence([cfg.seed, TASKS.index(cfg.task)]).spawn(3)
    train_rng, test_rng, sft_rng = (np.random.default_rng(s) for s in streams)
    return {
        "train": [make_pair(train_rng, cfg) for _ in range(cfg.num_train)],
        "test": [make_pair(test_rng, cfg) for _ in range(cfg.num_test)],
        "sft": [make_sft_row(sft_rng, cfg) for _ in range(cfg.num_sft)],
    }


def write_jsonl(rows: list[dict], path: str) -> str:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_task(cfg: ReviewsConfig, out_dir: str) -> dict[str, str]:
    """Generate and write `{train,test,sft}.jsonl` + `reviews_config.json` under out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    splits = generate(cfg)
    paths = {name: write_jsonl(rows, os.path.join(out_dir, f"{name}.jsonl")) for name, rows in splits.items()}
    with open(os.path.join(out_dir, "reviews_config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1, sort_keys=True)
    return paths


def corpus_texts(cfg: ReviewsConfig | None = None) -> list[str]:
    """Texts that cover the whole vocabulary (to train the tiny tokenizer): every word once, plus sample rows."""
    cfg = cfg or ReviewsConfig()
    rng = np.random.default_rng(cfg.seed)
    texts = [" ".join(vocab.all_words())]
    for task in TASKS:
        for domain in vocab.DOMAINS:
            texts += [f"{make_prompt(rng, task, domain)} {make_response(rng, cfg)}" for _ in range(200)]
    return texts
