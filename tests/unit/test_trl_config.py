"""MixDPOConfig and the flat names: one table over RunConfig (every key reachable, no collision), the TRL names,
the YAML / command line accepting the same names, and errors naming the flat field."""
from __future__ import annotations

import dataclasses

import pytest

from mixdpo_ds import MixDPOConfig
from mixdpo_ds.training.config import SECTIONS, RunConfig, load_config
from mixdpo_ds.training.config_names import Alias, base_path, flat_table, run_config_leaves
from mixdpo_ds.training.trl_config import FLAT

# the concepts TrainingArguments / DPOConfig share with us, under their names (the list)
SHARED = ["learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
          "max_steps", "lr_scheduler_type", "warmup_steps", "logging_steps", "eval_steps",
          "save_steps", "save_total_limit", "bf16", "max_length", "beta", "precompute_ref_log_probs",
          "gradient_checkpointing", "report_to", "seed", "output_dir", "deepspeed", "label_smoothing",
          "per_device_eval_batch_size", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
          "resume_from_checkpoint", "disable_tqdm", "push_to_hub", "hub_model_id", "hub_private_repo", "run_name",
          "data_seed", "disable_dropout"]
OLDER = ["warmup_ratio", "rpo_alpha"]  # transformers 4 / older TRL names, kept for their scripts


def test_every_run_config_key_is_reachable_by_one_flat_name():
    leaves = {leaf.path for leaf in run_config_leaves(SECTIONS)}
    covered = {base_path(alias.path) for _, alias in FLAT.values()}
    assert covered == leaves
    fields = {f.name for f in dataclasses.fields(MixDPOConfig)}
    assert fields == set(FLAT)


def test_shared_names_are_trl_and_transformers_names():
    from trl import DPOConfig

    trl_fields = {f.name for f in dataclasses.fields(DPOConfig)}
    fields = {f.name for f in dataclasses.fields(MixDPOConfig)}
    assert set(SHARED) <= fields
    assert set(SHARED) <= trl_fields, set(SHARED) - trl_fields  # the same concept under the same name
    assert set(OLDER) <= fields
    assert "max_prompt_length" in fields and "num_experts" in fields and "gate_kind" in fields


def test_a_colliding_new_field_is_an_error():
    @dataclasses.dataclass
    class A:
        mode: str = "x"

    @dataclasses.dataclass
    class B:
        mode: str = "y"

    with pytest.raises(AssertionError, match="flat name 'mode'"):
        flat_table({"model": A, "train": B}, names={})


def test_round_trip_run_config_flat_run_config(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["model.name_or_path=/m", "train.adam_betas=[0.8,0.95]",
                                            "train.keep_last=0", "model.dtype=bf16", "experts.kind=lora"])
    flat = MixDPOConfig.from_run_config(cfg)
    assert (flat.adam_beta1, flat.adam_beta2, flat.save_total_limit, flat.bf16) == (0.8, 0.95, None, True)
    assert flat.to_run_config().to_dict() == cfg.to_dict()


def test_converters_by_hand():
    cfg = MixDPOConfig(bf16=True, precompute_ref_log_probs=True, disable_tqdm=True, save_total_limit=None,
                       eval_steps=None, report_to="none", adam_beta2=0.9, learning_rate=3e-5,
                       per_device_train_batch_size=2, gradient_accumulation_steps=3).to_run_config("/m")
    t = cfg.train
    assert (cfg.model.dtype, t.reference, t.progress_bar, t.keep_last, t.eval_every) == \
        ("bf16", "precompute", False, 0, 0)
    assert (t.report_to, t.adam_betas, t.lr, t.micro_batch_size, t.grad_accum) == ([], [0.9, 0.9], 3e-5, 2, 3)


def test_yaml_and_overrides_take_the_same_names(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("model_name_or_path: /m\nlearning_rate: 2.0e-5\nnum_experts: 2\ngate_kind: moe\n"
                    "deepspeed: zero2\nadam_beta1: 0.8\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("model: {name_or_path: /m}\ntrain: {lr: 2.0e-5, adam_betas: [0.8, 0.999]}\n"
                      "experts: {num_experts: 2}\ngate: {kind: moe}\ndeepspeed: {config: zero2}\n")
    a, b = load_config(flat), load_config(nested)
    assert a.to_dict() == b.to_dict()
    c = load_config(None, ["model_name_or_path=/m", "learning_rate=2e-5", "num_experts=2", "gate.kind=moe",
                           "deepspeed=zero2", "train.adam_betas=[0.8,0.999]"])
    assert c.to_dict() == a.to_dict()
    d = MixDPOConfig(model_name_or_path="/m", learning_rate=2e-5, num_experts=2, gate_kind="moe", deepspeed="zero2",
                     adam_beta1=0.8).to_run_config()
    assert d.to_dict() == a.to_dict()


def test_errors_name_the_flat_field():
    with pytest.raises(ValueError, match=r"train\.lr=.*MixDPOConfig\.learning_rate"):
        MixDPOConfig(learning_rate=-1.0)
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['learnig_rate'\]; closest names: .*'learning_rate'"):
        MixDPOConfig(learnig_rate=1e-5)
    with pytest.raises(ValueError, match="bf16"):
        MixDPOConfig(bf16="yes")
    with pytest.raises(ValueError, match=r"report_to.*allowed"):
        MixDPOConfig(report_to=["comet"])
    with pytest.raises(ValueError, match="'learnin_rate' must be section.key .* or a flat name"):
        load_config(None, ["model_name_or_path=/m", "learnin_rate=1"])


def test_trl_names_point_at_real_keys():
    leaves = {leaf.path for leaf in run_config_leaves(SECTIONS)}
    from mixdpo_ds.training.config_names import TRL_NAMES

    assert all(base_path(a.path) in leaves for a in TRL_NAMES.values())
    assert isinstance(TRL_NAMES["learning_rate"], Alias)


def test_cli_train_needs_no_config_and_prints_every_field(capsys):
    from mixdpo_ds import cli

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in FLAT:
        assert f"--{name} VALUE" in text
    for name in ("learning_rate", "num_experts", "em_mode"):
        leaf, _ = FLAT[name]
        assert " ".join(leaf.field.metadata["help"].split())[:40] in text
    args = cli.build_parser().parse_args(["train", "--model_name_or_path", "/m", "--learning_rate", "1e-5",
                                          "--report_to", "wandb", "train.max_steps=3"])
    cfg = load_config(args.config, cli._field_flags(args) + args.overrides)
    assert (cfg.model.name_or_path, cfg.train.lr, cfg.train.report_to, cfg.train.max_steps) == \
        ("/m", 1e-5, ["wandb"], 3)
    assert isinstance(cfg, RunConfig)


def test_the_top_level_trainer_takes_a_run_config_too():
    from mixdpo_ds import MixDPOTrainer
    from mixdpo_ds.training.trainer import MixDPOTrainer as Recipe

    cfg = load_config(None, ["model_name_or_path=/m", "dataset_name=/d.jsonl", "report_to=[wandb]"])
    trainer = MixDPOTrainer(cfg)
    assert isinstance(trainer.recipe, Recipe) and trainer.cfg is cfg and trainer.out_dir == trainer.recipe.out_dir
    assert trainer.args.model_name_or_path == "/m" and trainer.args.report_to == ["wandb"]
    assert [type(cb).__name__ for cb in trainer.recipe.callbacks.callbacks] == ["_History", "WandbTracker"]
