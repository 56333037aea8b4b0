"""RunConfig: defaults ← YAML ← a.b=c overrides, unknown keys named, to_yaml round trip, field checks."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mixdpo_ds.training.config import SECTIONS, RunConfig, TrainConfig, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path, data: dict, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


MINIMAL = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}}


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = write(tmp_path, {**MINIMAL, "train": {"lr": 0.5, "max_steps": 7}})
    cfg = load_config(path, ["train.lr=1e-5", "experts.kind=models", "experts.lr_experts=[0.1, 0.2, 0.3]",
                             "em.estep.lambda_w=2"])
    assert cfg.train.lr == 1e-5  # override beats YAML
    assert cfg.train.max_steps == 7  # YAML beats default
    assert cfg.train.micro_batch_size == TrainConfig().micro_batch_size  # default
    assert cfg.experts.lr_experts == [0.1, 0.2, 0.3]  # values parsed with yaml.safe_load
    assert cfg.em.estep.lambda_w == 2  # nested dataclass inside a section
    assert cfg.train.resume_from is None
    assert load_config(path, ["train.resume_from=null"]).train.resume_from is None
    assert load_config(path, ["train.resume_from=auto"]).train.resume_from == "auto"
    # `1e-4` in a YAML file is a float too (plain YAML 1.1 reads it as a string)
    text = "model: {name_or_path: m}\ndata: {path: d}\ntrain: {lr: 1e-4, weight_decay: 2E-2}\n"
    (tmp_path / "sci.yaml").write_text(text)
    sci = load_config(tmp_path / "sci.yaml")
    assert sci.train.lr == 1e-4 and sci.train.weight_decay == 0.02


def test_unknown_keys_name_the_key_and_allowed(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ValueError, match=r"'train\.lrr'.*allowed keys in train.*'lr'"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(ValueError, match=r"'trian'.*allowed keys.*'train'"):
        load_config(path, ["trian.lr=1"])
    with pytest.raises(ValueError, match=r"'em\.estep\.lambda_x'.*'lambda_w'"):
        load_config(path, ["em.estep.lambda_x=1"])
    with pytest.raises(ValueError, match=r"'model\.foo'"):
        load_config(write(tmp_path, {**MINIMAL, "model": {"name_or_path": "m", "foo": 1}}, "foo.yaml"))
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["train.lr"])


def test_field_checks_name_key_and_allowed(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ValueError, match=r"model\.dtype must be one of \['fp32', 'bf16'\], got 'fp16'"):
        load_config(path, ["model.dtype=fp16"])
    with pytest.raises(ValueError, match=r"train\.reference must be one of \['model', 'precompute'\]"):
        load_config(path, ["train.reference=disk"])
    with pytest.raises(ValueError, match=r"train\.lr_schedule"):
        load_config(path, ["train.lr_schedule=step"])
    with pytest.raises(ValueError, match=r"train\.max_steps"):
        load_config(path, ["train.max_steps=0"])
    with pytest.raises(ValueError, match=r"deepspeed\.zero_stage"):
        load_config(path, ["deepspeed.zero_stage=4"])
    with pytest.raises(ValueError, match=r"em\.mode"):
        load_config(path, ["em.mode=foo"])
    with pytest.raises(ValueError, match=r"loss\.rpo_alpha must be >= 0, got -0\.1"):
        load_config(path, ["loss.rpo_alpha=-0.1"])
    with pytest.raises(ValueError, match="model.name_or_path is required"):
        load_config(write(tmp_path, {"data": {"path": "d"}}, "no_model.yaml"))
    with pytest.raises(ValueError, match="alternate"):
        load_config(path, ["em.gate_update=alternate"])  # the mix gate has a closed form


def test_to_yaml_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["em.phases=paper", "deepspeed.config={stage: 1}",
                                                 "experts.num_experts=2"])
    out = tmp_path / "resolved.yaml"
    text = cfg.to_yaml(out)
    assert out.read_text() == text and list(yaml.safe_load(text)) == list(SECTIONS)
    again = load_config(out)
    assert again == cfg
    assert again.to_dict()["train"] == {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("name", ["tiny.yaml", "gpt2_imdb.yaml", "llama.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name, ["model.name_or_path=some/model"])
    assert isinstance(cfg, RunConfig)
