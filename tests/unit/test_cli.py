"""`mixdpo` argument parsing: subcommands, overrides, the launcher's --local_rank, lazy demo dispatch."""
from __future__ import annotations

import pytest

from mixdpo_ds import cli


def test_train_args_and_launcher_local_rank():
    args = cli.build_parser().parse_args(["--local_rank=3", "train", "--config", "c.yaml", "train.lr=1e-5", "a.b=c"])
    assert (args.local_rank, args.config, args.overrides) == (3, "c.yaml", ["train.lr=1e-5", "a.b=c"])
    assert args.func is cli._train


def test_generate_options_are_exclusive():
    args = cli.build_parser().parse_args(["generate", "--run", "r", "--prompt", "p", "--expert", "2"])
    assert (args.expert, args.route, args.max_new_tokens) == (2, "sample", 32)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--run", "r", "--prompt", "p", "--expert", "1", "--route", "top1"])


def test_demo_dispatches_lazily(monkeypatch):
    import mixdpo_ds.apps.demo as demo

    seen = []
    monkeypatch.setattr(demo, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["demo", "--steps", "3"]) == 0
    assert seen == [["--steps", "3"]]
