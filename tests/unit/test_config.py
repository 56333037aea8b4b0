"""RunConfig: defaults ← YAML ← a.b=c overrides, unknown keys named, to_yaml round trip, field checks."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mixdpo_ds.training.config import SECTIONS, RunConfig, TrainConfig, load_config, parse_overrides, yaml_load

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


# ----------------------------------------------------------------------------- values checked by type


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_size=abc", "train.micro_batch_size='abc': expected an integer (int), got str"),
    ("train.lr=fast", "train.lr='fast': expected a finite number (float) or null, got str"),
    ("experts.num_experts=2.5", "experts.num_experts=2.5: expected an integer (int), got float"),
    ("train.export=maybe", "train.export='maybe': expected a boolean (true or false), got str"),
    ("train.lr=.inf", "train.lr=inf: must be a finite number (float), not inf or nan"),
    ("em.gumbel.tau=.nan", "em.gumbel.tau=nan: must be a finite number (float), not inf or nan"),
    ("train.lr=1e30", "train.lr=1e+30: must be finite and in (0, 1000) (the AdamW learning rate; typical values "
                      "are 1e-6 to 1e-2)"),
    ("train.max_steps=true", "train.max_steps=True: expected an integer (int), got bool"),  # bool is no int
    ("deepspeed.zero_stage=yes", "deepspeed.zero_stage=True: expected an integer (int) or null, got bool"),
    ("experts.lr_experts=[0.1, x, 0.3]", "experts.lr_experts[1]='x': expected a finite number (float), got str"),
    ("experts.lr_experts=abc", "experts.lr_experts='abc': expected a list of numbers (list[float]), a finite number "
                               "(float) or null, got str"),
    ("em.phases=[{start: soon}]", "em.phases[0].start='soon': expected a finite number (float), got str"),
    ("em.phases=5", "em.phases=5: expected a list of Phase mappings (list[Phase]), a string (str) or null, got int"),
    ("em.estep=3", "em.estep=3: expected a mapping of EStepWeights fields (dict), got int"),
    ("model.name_or_path=123", "model.name_or_path=123: expected a string (str), got int"),
    ("train.adam_betas=[0.9, 1.0]", "train.adam_betas=[0.9, 1.0]: must be two numbers in [0, 1)"),
    ("train.seed=-1", "train.seed=-1: must be an integer in [0, 2**63)"),
])
def test_override_values_are_checked_by_type_naming_key_value_and_form(tmp_path, override, message):
    with pytest.raises(ValueError) as e:
        load_config(write(tmp_path, MINIMAL), [override])
    assert str(e.value).startswith(message), str(e.value)


def test_a_yaml_string_where_an_integer_is_wanted_is_an_error(tmp_path):
    path = write(tmp_path, {**MINIMAL, "train": {"micro_batch_size": "4"}})  # safe_dump quotes it: '4'
    assert "'4'" in path.read_text()
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert str(e.value) == "train.micro_batch_size='4': expected an integer (int), got str"


def test_ints_are_accepted_for_floats_and_made_floats(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.lr=1", "loss.beta=2", "experts.lr_experts=1",
                                                 "em.phases=[{start: 0, beta: 1}]", "train.adam_betas=[0, 0.5]"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert type(cfg.loss.beta) is float and type(cfg.experts.lr_experts) is float
    assert cfg.em.phases[0]["beta"] == 1.0 and type(cfg.em.phases[0]["beta"]) is float
    assert cfg.train.adam_betas == [0.0, 0.5]
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_duplicate_yaml_key_names_the_key_the_file_and_the_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {path: d}\ntrain:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.2\n")
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}, line 6, column 3: duplicate key 'lr' (first at line 4); a key may appear only "
                            "once in a mapping")
    # a key given by a `<<` merge may still be overridden: that is not a duplicate
    assert yaml_load("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  p: 3\n")["b"] == {"p": 3, "q": 2}


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name_or_path: m}\ndata:\n  path: d\n   bad: 1\n")
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert str(e.value) == f"{path}, line 4, column 7: invalid YAML: mapping values are not allowed here"
    assert "<unicode string>" not in str(e.value)
    with pytest.raises(ValueError) as e:
        load_config(write(tmp_path, MINIMAL), ["train.adam_betas=[0.9,"])
    assert str(e.value).startswith("override 'train.adam_betas=[0.9,', line 1, column 6: invalid YAML: ")


def test_host_mmap_threshold_is_a_non_negative_int():
    cfg = load_config(None, ["model.name_or_path=gpt2", "train.host_mmap_threshold_mb=0"])
    assert cfg.train.host_mmap_threshold_mb == 0
    assert TrainConfig().host_mmap_threshold_mb == 4
    for bad in ("-1", "2.5"):
        with pytest.raises(ValueError, match=r"train\.host_mmap_threshold_mb"):
            load_config(None, ["model.name_or_path=gpt2", f"train.host_mmap_threshold_mb={bad}"])
