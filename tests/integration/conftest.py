"""Fixtures of the integration tier: a synthetic two-group preference file and a `train` helper that runs
the real CLI in-process (`mixdpo_ds.cli.main`).

The synthetic data has two annotator groups with opposite tastes on the same prompts (group "pos" prefers
the positive review, "neg" the negative one), three users per group: one DPO policy cannot fit both, a
mixture of two can, and a user-conditioned gate can route by user.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixdpo_ds import cli

POS = [" I loved it, great fun.", " A wonderful film, great acting.", " Great music and a great story."]
NEG = [" I hated it, so dull.", " A boring film, awful acting.", " Awful music and a dull story."]
PROMPTS = ["Review the movie:", "Write a short review:", "What did you think of the film?", "Your opinion:"]


def synthetic_rows(n: int = 48, conflict: bool = True) -> list[dict]:
    """conflict=True: rows 2j and 2j+1 are the same pair judged oppositely by the two groups (only a gate
    that sees the user can fit both); False: each group has its own prompts (the prompt tells the group)."""
    rows = []
    for i in range(n):
        group = "pos" if i % 2 == 0 else "neg"
        user = f"u{(i // 2) % 3 + (0 if group == 'pos' else 3)}"
        j = i // 2  # rows 2j and 2j+1: the same pair, judged oppositely by the two groups
        good, bad = POS[j % 3], NEG[(j // 3) % 3]
        chosen, rejected = (good, bad) if group == "pos" else (bad, good)
        prompt = PROMPTS[j % 4] if conflict else PROMPTS[(j % 2) + (0 if group == "pos" else 2)]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "user": user,
                     "group": group})
    return rows


@pytest.fixture(scope="session")
def prefs_jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
    return str(path)


@pytest.fixture(scope="session")
def prefs_by_prompt_jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prefs") / "prefs_by_prompt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(conflict=False)))
    return str(path)


@pytest.fixture(autouse=True)
def _few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # other test tiers run beside this one on 2 cores
    yield
    torch.set_num_threads(n)


def base_overrides(model_dir: str, data_path: str, out_dir: Path, **extra) -> list[str]:
    """Overrides of configs/tiny.yaml for a fast CPU run on `data_path`."""
    over = {
        "model.name_or_path": model_dir, "data.path": data_path, "data.group_column": "group",
        "data.max_length": 48, "data.max_prompt_length": 24, "train.output_dir": str(out_dir),
        "train.progress_bar": False, "train.plots": False,
    }
    over.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in over.items()]


def train(model_dir: str, data_path: str, out_dir: Path, **extra) -> list[dict]:
    """`mixdpo train --config configs/tiny.yaml ...` in-process; returns the metrics.jsonl rows."""
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    assert cli.main(["train", "--config", str(config), *base_overrides(model_dir, data_path, out_dir, **extra)]) == 0
    return read_rows(out_dir / "metrics.jsonl")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss" in r]
