"""`mixdpo plan` (training/plan.py): exact parameter counts against built models, hand-computed bytes per rank."""
from __future__ import annotations

import logging

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mixdpo_ds.cli import main
from mixdpo_ds.model.expert_init import build_lora
from mixdpo_ds.model.experts import ExpertsConfig, build_policy
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.model_shapes import PRESETS, Shape, preset_config
from mixdpo_ds.training.plan import format_plan, grid_markdown, log_plan, plan_memory, policy_tensors

LLAMA_TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("config", [
    GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32),
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16, n_inner=80),
    LlamaConfig(**LLAMA_TINY),
    LlamaConfig(**LLAMA_TINY, tie_word_embeddings=True, attention_bias=True),
    LlamaConfig(**{**LLAMA_TINY, "num_key_value_heads": 4}, head_dim=8),
], ids=["gpt2", "gpt2-n_inner", "llama-gqa", "llama-tied-bias", "llama-head_dim"])
def test_parameter_counts_equal_the_built_model(config):
    model = (GPT2LMHeadModel if config.model_type == "gpt2" else LlamaForCausalLM)(config)
    shape = Shape.of(config)
    assert shape.model_params() == _numel(model.parameters())
    assert shape.trunk_params() == _numel(model.base_model.parameters())


def test_llama_3_presets_have_the_published_sizes():
    assert Shape.of(preset_config("llama-3-8b")).model_params() == 8_030_261_248
    assert Shape.of(preset_config("llama-3-70b")).model_params() == 70_553_706_496
    assert Shape.of(preset_config("gpt2")).model_params() == 124_439_808


@pytest.mark.parametrize("arch,targets", [("gpt2", None), ("gpt2", ["c_proj", "c_fc"]), ("llama", None),
                                          ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])])
def test_lora_counts_equal_peft(arch, targets):
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=60) if arch == "gpt2" else LlamaConfig(**LLAMA_TINY)
    base = (GPT2LMHeadModel if arch == "gpt2" else LlamaForCausalLM)(config)
    ex = ExpertsConfig(kind="lora", num_experts=3, lora_r=4, lora_target_modules=targets)
    model = build_lora(base, ex, seed=0)
    t = policy_tensors(Shape.of(config), ex)
    assert t.trainable == _numel(p for n, p in model.named_parameters() if "lora_" in n)
    assert t.frozen == _numel(p for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("kwargs", [
    dict(kind="heads", trunk="frozen"), dict(kind="heads", trunk="trainable"),
    dict(kind="heads", trunk="trainable", num_experts=1, init_noise=0.0),
    dict(kind="heads", trunk="frozen", head_rank=4), dict(kind="heads", trunk="trainable", head_rank=4),
    dict(kind="models"), dict(kind="lora", lora_r=2),
], ids=["heads-frozen", "heads-trainable", "heads-tied-k1", "lowrank-frozen", "lowrank-trainable", "models", "lora"])
def test_policy_tensors_equal_the_built_policy(tiny_gpt2_dir, kwargs):
    from transformers import AutoConfig

    ex = ExpertsConfig(**{"num_experts": 3, **kwargs})
    policy = build_policy(tiny_gpt2_dir, ex)
    t = policy_tensors(Shape.of(AutoConfig.from_pretrained(tiny_gpt2_dir)), ex)
    assert t.trainable == _numel(p for p in policy.parameters() if p.requires_grad)
    assert t.frozen == _numel(p for p in policy.parameters() if not p.requires_grad)
    assert t.buffer == _numel(policy.buffers())


# A GPT-2 with V=100, H=16, 1 layer, 8 positions: trunk = wte 1600 + wpe 128 + layer 3280 + ln_f 32 = 5040
# (layer: c_attn 16·48+48, attn.c_proj 16·16+16, c_fc 16·64+64, mlp.c_proj 64·16+16, ln_1 + ln_2 4·16);
# K = 2 heads: 2 · 100·16 = 3200; the frozen trunk keeps the base head (1600) as a buffer.
SMALL = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100, n_positions=8)


def _plan(world, stage, *extra, **kwargs):
    cfg = load_config(None, ["model.name_or_path=small", f"deepspeed.config=zero{stage}", "experts.num_experts=2",
                             "train.micro_batch_size=1", "data.max_length=8", "data.max_prompt_length=4",
                             "experts.logprob_impl=chunked", *extra])
    return plan_memory(cfg, world, SMALL, runtime_bytes=0, **kwargs)


def _rows(plan, *names):
    return [plan.bytes_of(n) for n in names]


STATE = ("parameters", "gradients", "master weights", "optimizer states")


@pytest.mark.parametrize("world,stage,expected", [
    (1, 0, [4 * 8240 + 4 * 1600, 4 * 3200, 0, 8 * 3200]),
    (2, 0, [4 * 8240 + 4 * 1600, 4 * 3200, 0, 8 * 3200]),
    # ZeRO-2: grads partitioned + their fp32 flat copy; an fp32 master partition; states partitioned
    (2, 2, [4 * 8240 + 4 * 1600, 4 * 3200 // 2 + 4 * 3200 // 2, 4 * 3200 // 2, 8 * 3200 // 2]),
    # ZeRO-3 fp32: parameters partitioned (not the buffer); DeepSpeed 0.19.8 copies the flat partition into an fp32
    # master even in fp32 (measured: docs/scaling.md)
    (2, 3, [4 * 8240 // 2 + 4 * 1600, 4 * 3200 // 2, 4 * 3200 // 2, 8 * 3200 // 2]),
])
def test_frozen_heads_bytes_by_hand(world, stage, expected):
    assert _rows(_plan(world, stage), *STATE) == expected


def test_bf16_zero0_keeps_fp32_master_and_grads():
    n, N = 3200, 8240
    assert _rows(_plan(1, 0, "model.dtype=bf16"), *STATE) == [2 * N + 2 * 1600, 2 * n + 4 * n, 4 * n, 8 * n]


def test_zero3_two_ranks_halve_params_grads_and_optimizer():
    one, two = _plan(1, 3, "experts.trunk=trainable"), _plan(2, 3, "experts.trunk=trainable")
    for name in STATE:
        assert two.bytes_of(name) * 2 == one.bytes_of(name)
    assert one.bytes_of("parameters") == 4 * (5040 + 3200)


def test_reference_rows():
    assert _plan(1, 0).bytes_of("reference") == 0                                   # frozen heads: the policy itself
    assert _plan(2, 3).bytes_of("reference") == 0                         # ZeRO-3: through the policy's engine
    assert _plan(2, 3, builtin_reference_zero3=False, sharded_reference=False).bytes_of("reference") == 4 * 5040
    assert _plan(2, 3, builtin_reference_zero3=False).bytes_of("reference") == 4 * 5040 // 2  # a sharded engine
    assert _plan(2, 3, "experts.trunk=trainable").bytes_of("reference") == 4 * 5040 // 2
    assert _plan(1, 0, "experts.trunk=trainable").bytes_of("reference") == 4 * 5040
    assert _plan(1, 0, "experts.trunk=trainable", "train.reference=precompute").bytes_of("reference") == 0


def test_activation_and_logit_bytes_by_hand():
    # rows 2 × T 8 = 16 tokens; one layer saves 9·16 + 2·64 = 272 elements per token; + 3 (rows, T, H) tensors
    plan = _plan(1, 0, "experts.trunk=trainable", "train.gradient_checkpointing=false")
    assert plan.bytes_of("activations") == 272 * 16 * 4 + 3 * 16 * 16 * 4
    # 14 response tokens at most: chunked tile (14, 100) fp32 × 3 + a (100, 16) fp32 block + 3 (14, 16) copies
    assert plan.bytes_of("logits") == 3 * 14 * 100 * 4 + 100 * 16 * 4 + 14 * 16 * (4 + 4 + 4)
    naive = _plan(1, 0, "experts.logprob_impl=naive")
    assert naive.bytes_of("logits") == 3 * 14 * 2 * 100 * 4 + 14 * 16 * 12                # (N, K, V) fp32 × 3


def test_checkpointing_keeps_only_layer_inputs():
    deep = GPT2Config(n_layer=6, n_embd=16, n_head=2, vocab_size=100, n_positions=8)
    cfgs = [load_config(None, ["model.name_or_path=x", "experts.trunk=trainable", f"train.gradient_checkpointing={v}",
                               "data.max_length=8", "data.max_prompt_length=4", "train.micro_batch_size=1"])
            for v in ("false", "true")]
    off, on = (plan_memory(c, 1, deep).bytes_of("activations") for c in cfgs)
    tokens = 16
    assert off == 6 * 272 * tokens * 4 + 3 * tokens * 16 * 4
    assert on == 6 * tokens * 16 * 4 + 3 * tokens * 16 * 4 + 272 * tokens * 4


def test_working_set_by_stage():
    ws = [_plan(2, stage).bytes_of("DeepSpeed working set") for stage in (0, 1, 2, 3)]
    # ZeRO-0: the all-reduce's flat copy of the 3200 gradients; ZeRO-1: the reduce bucket (all 3200); ZeRO-2: + the
    # heads' full gradient; ZeRO-3 on 2 ranks: + gathered copies of heads 3200 + embedding 1600 + live and prefetched
    # parameters, capped at all 8240 parameters
    assert ws == [4 * 3200, 4 * 3200, 4 * 3200 + 4 * 3200, 4 * 3200 + 4 * 3200 + 4 * 8240]
    # one rank gathers nothing (each partition is the whole tensor)
    assert _plan(1, 3).bytes_of("DeepSpeed working set") == 4 * 3200 + 4 * 3200


def test_zero3_gathers_the_heads_embedding_and_the_live_parameters():
    """GPT-2 medium (V = 50,257, H = 1024, frozen trunk 354.8 M): heads K = 2 x V·H = 102,926,336 and the embedding
    V·H = 51,463,168 gathered whole; ds_configs/zero3.json keeps up to 1e8 live parameters + a 5e7 prefetch bucket;
    304.4 M in all, under the 457.8 M total, so the cap does not bind."""
    cfg = load_config(None, ["model.name_or_path=x", "deepspeed.config=zero3", "experts.num_experts=2"])
    ws = plan_memory(cfg, 2, "gpt2-medium", runtime_bytes=0).bytes_of("DeepSpeed working set")
    VH = 50257 * 1024
    bucket, full_grad = 4 * 50_000_000, 4 * 2 * VH
    assert ws == bucket + full_grad + 4 * (2 * VH + VH + 100_000_000 + 50_000_000)


def test_total_is_the_sum_and_the_table_lists_every_row():
    plan = _plan(2, 3)
    assert plan.total == sum(b for _, b, _ in plan.rows)
    text = format_plan(plan)
    for name, _, _ in plan.rows:
        assert name in text
    assert "total" in text and "ZeRO-3" in text


def test_cli_prints_the_table(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--world-size", "8", "deepspeed.config=zero3", "model.dtype=bf16",
                 "experts.kind=lora"]) == 0
    out = capsys.readouterr().out
    assert "llama V=128256 H=4096 L=32, lora K=3, ZeRO-3, 8 rank(s), bf16" in out
    assert "8,030,261,248" in out and "total" in out and "GiB" in out


def test_cli_reads_the_models_config(capsys, tiny_gpt2_dir):
    assert main(["plan", "--config", "configs/tiny.yaml", f"model.name_or_path={tiny_gpt2_dir}"]) == 0
    assert "gpt2 V=" in capsys.readouterr().out


def test_bad_preset_names_the_allowed_ones():
    with pytest.raises(ValueError, match="llama-3-8b.*llama-3-70b"):
        main(["plan", "--model", "llama-9b"])
    assert "gpt2" in PRESETS


def test_unsupported_architecture_names_the_counted_ones():
    with pytest.raises(ValueError, match="gpt2.*llama"):
        Shape.of(type("C", (), {"model_type": "t5"})())


def test_log_plan_logs_the_table_and_warns_on_an_unknown_model(caplog, tiny_gpt2_dir):
    cfg = load_config("configs/tiny.yaml", [f"model.name_or_path={tiny_gpt2_dir}"])
    with caplog.at_level(logging.INFO, logger="mixdpo_ds"):
        assert log_plan(cfg, 1) is not None
    assert "memory plan" in caplog.text and "optimizer states" in caplog.text
    caplog.clear()
    cfg = load_config("configs/tiny.yaml", ["model.name_or_path=/nonexistent/model"])
    with caplog.at_level(logging.WARNING, logger="mixdpo_ds"):
        assert log_plan(cfg, 1) is None
    assert "memory plan unavailable" in caplog.text


def test_grid_has_one_row_per_cell():
    text = grid_markdown(models=("llama-3-8b",), experts=(2, 4), kinds=("heads",), stages=(3,), worlds=(8, 64))
    lines = text.splitlines()
    assert len(lines) == 2 + 4 and lines[2].startswith("| llama-3-8b | heads | 2 | 3 | 8 |")


def test_auto_zero_sizes_fall_back_to_deepspeeds_defaults(tmp_path):
    """HF Trainer-style configs say "auto" for the bucket sizes: the plan uses DeepSpeed's defaults (reduce bucket
    5e8, live 1e9, prefetch 5e7), which on this small model cap at its parameter counts."""
    import json

    path = tmp_path / "zero3_auto.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                      "stage3_prefetch_bucket_size": "auto"}}))
    ws = _plan(2, 3, f"deepspeed.config={path}").bytes_of("DeepSpeed working set")
    assert ws == 4 * 3200 + 4 * 3200 + 4 * 8240  # as with numbers: bucket = all 3200 trainable, gathered = all 8240
