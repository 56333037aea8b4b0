"""The streamed export (training/export_stream.py): shards + index that `from_pretrained` loads with the weights
of `policy.expert_model(k)`, the config save_pretrained writes, the compact layout, and evaluate / generate on a
compact-only export."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _experts_testlib import make_batch, policy_logps
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mixdpo_ds.model.experts import ExpertsConfig, build_policy
from mixdpo_ds.model.gating import build_gate
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.evaluate import evaluate_run
from mixdpo_ds.training.export import export_experts, load_compact, load_expert, load_experts, run_export_dir
from mixdpo_ds.training.export_stream import ShardWriter, parse_shard_size
from mixdpo_ds.training.generate import generate

SHARD = "20KB"  # the tiny models have ~100-300 KB of weights: several shards each
TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> str:
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    out = str(tmp_path_factory.mktemp("tiny_llama"))
    model.save_pretrained(out)
    return out


def _trained_like(policy):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return policy


def test_export_config_fields_and_shard_sizes():
    from mixdpo_ds import MixDPOConfig

    assert MixDPOConfig(model_name_or_path="x", export_format="both",
                        export_max_shard_size="1MB").to_run_config().train.export_format == "both"
    assert parse_shard_size("2GB") == 2 * 10**9 and parse_shard_size("64KiB") == 65536
    assert parse_shard_size(" 1.5 mb ") == 1_500_000 and parse_shard_size(123) == 123
    for bad in ("2 parsecs", "0MB", -1, True, "GB"):
        with pytest.raises(ValueError, match=r"train.export_max_shard_size=.*expected a size such as '2GB'"):
            parse_shard_size(bad, "train.export_max_shard_size")
    with pytest.raises(ValueError, match="train.export_max_shard_size"):
        load_config(TINY, ["model.name_or_path=x", "train.export_max_shard_size=lots"])
    with pytest.raises(ValueError, match=r"train.export_format must be one of \['experts', 'compact', 'both'\]"):
        load_config(TINY, ["model.name_or_path=x", "train.export_format=zip"])
    with pytest.raises(ValueError, match="train.export_format='both' .* is for experts.kind='heads', not 'lora'"):
        load_config(TINY, ["model.name_or_path=x", "train.export_format=both", "experts.kind=lora"])
    with pytest.raises(ValueError, match="train.push_to_hub .* must be 'experts' or 'both'"):
        load_config(TINY, ["model.name_or_path=x", "train.export_format=compact", "train.push_to_hub=true"])


def test_shard_writer_splits_at_the_limit_and_names_shards_like_transformers(tmp_path):
    writer = ShardWriter(str(tmp_path), max_bytes=100)
    tensors = {"a": torch.zeros(10), "b": torch.ones(10), "c": torch.arange(50.0), "d": torch.ones(2)}  # 40,40,200,8 B
    for key, t in tensors.items():
        writer.add(key, t)
    assert writer.close() == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    # a + b fit 100 bytes; c (200 bytes, above the limit) gets a shard of its own; d starts the next
    assert index["weight_map"] == {"a": "model-00001-of-00003.safetensors", "b": "model-00001-of-00003.safetensors",
                                   "c": "model-00002-of-00003.safetensors", "d": "model-00003-of-00003.safetensors"}
    assert index["metadata"] == {"total_parameters": 72, "total_size": 288}
    for key, t in tensors.items():
        assert torch.equal(load_file(tmp_path / index["weight_map"][key])[key], t)
    with pytest.raises(ValueError, match="written twice"):
        one = ShardWriter(str(tmp_path / "one"), max_bytes=100)
        one.add("a", torch.zeros(1))
        one.add("a", torch.zeros(1))


CASES = [("gpt2", dict(kind="heads", trunk="frozen")), ("gpt2", dict(kind="heads", trunk="trainable")),
         ("gpt2", dict(kind="heads", trunk="frozen", head_rank=2)),
         ("gpt2", dict(kind="heads", trunk="trainable", head_rank=2)),      # W: the tied input embedding
         ("gpt2", dict(kind="models")), ("llama", dict(kind="heads", trunk="frozen")),
         ("llama", dict(kind="heads", trunk="frozen", head_rank=2)), ("llama", dict(kind="models"))]


@pytest.mark.parametrize("arch, kw", CASES)
def test_streamed_expert_equals_expert_model(arch, kw, tiny_gpt2_dir, tiny_llama_dir, tiny_tokenizer, tmp_path):
    """Several shards + index; from_pretrained gives expert_model(k)'s state exactly, and the files hold the
    keys, config.json and generation_config.json that expert_model(k).save_pretrained writes."""
    base = tiny_gpt2_dir if arch == "gpt2" else tiny_llama_dir
    policy = _trained_like(build_policy(base, ExpertsConfig(num_experts=2, init_noise=0.1, **kw)))
    out = export_experts(policy, None, str(tmp_path / "export"), tiny_tokenizer, max_shard_size=SHARD)
    for k in range(2):
        expert_dir = Path(out) / f"expert_{k}"
        index = json.loads((expert_dir / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 3
        want = policy.expert_model(k)
        want.save_pretrained(tmp_path / f"ref_{k}")
        ref_keys = load_file(tmp_path / f"ref_{k}" / "model.safetensors").keys()
        assert sorted(index["weight_map"]) == sorted(ref_keys)
        got = AutoModelForCausalLM.from_pretrained(expert_dir).state_dict()
        assert got.keys() == want.state_dict().keys()
        for name, tensor in want.state_dict().items():
            assert torch.equal(got[name], tensor), name
        for name in ("config.json", "generation_config.json"):
            ours, theirs = (json.loads((d / name).read_text()) for d in (expert_dir, tmp_path / f"ref_{k}"))
            assert ours == theirs, name


def test_compact_round_trip_sharded_and_compact_only(tiny_gpt2_dir, tiny_tokenizer, tmp_path):
    policy = _trained_like(build_policy(tiny_gpt2_dir, ExpertsConfig(num_experts=3, init_noise=0.1, head_rank=2,
                                                                     logprob_impl="naive")))
    batch = make_batch(3)
    expected = policy_logps(policy, batch).logps.detach()                                 # (2B, K)
    out = export_experts(policy, None, str(tmp_path / "export"), tiny_tokenizer, layout="compact",
                         max_shard_size=SHARD)
    assert sorted(os.listdir(out)) == ["README.md", "compact", "export.json"]
    assert json.loads((Path(out) / "export.json").read_text())["layout"] == ["compact"]
    index = json.loads((Path(out) / "compact" / "heads.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["heads.0", "heads.1", "heads.2"]
    assert len(set(index["weight_map"].values())) > 1
    assert (Path(out) / "compact" / "trunk" / "model.safetensors.index.json").is_file()
    for loaded in (load_compact(out, logprob_impl="naive"), load_experts(out, logprob_impl="naive")):
        assert loaded.kind == "heads"
        torch.testing.assert_close(policy_logps(loaded, batch).logps, expected, atol=1e-5, rtol=0)
    want = policy.expert_model(1).state_dict()
    got = load_expert(out, 1).state_dict()                                               # trunk + head 1
    assert got.keys() == want.keys() and all(torch.equal(got[n], t) for n, t in want.items())
    run = tmp_path / "run"
    (run / "export").parent.mkdir(exist_ok=True)
    os.replace(out, run / "export")
    assert run_export_dir(str(run)) == run / "export"


def test_merged_lora_streams_the_merged_model(tiny_gpt2_dir, tiny_tokenizer, tmp_path):
    policy = _trained_like(build_policy(tiny_gpt2_dir, ExpertsConfig(kind="lora", num_experts=2, init_noise=0.5)))
    out = export_experts(policy, None, str(tmp_path / "export"), tiny_tokenizer, merged=True, max_shard_size=SHARD)
    for k in range(2):
        merged = Path(out) / "merged" / f"expert_{k}"
        assert (merged / "model.safetensors.index.json").is_file()
        got = AutoModelForCausalLM.from_pretrained(merged).state_dict()
        want = policy.expert_model(k).state_dict()
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=name)
    delta = [(n, (got[n] - AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).state_dict()[n]).abs().max())
             for n in got if "c_attn.weight" in n]
    assert delta and all(d > 0 for _, d in delta)   # the adapters changed the merged weights


def _compact_run(root: Path, model_dir: str, tokenizer, gate: dict) -> Path:
    run = root / "run"
    over = {"model.name_or_path": model_dir, "data.path": "unused.jsonl", "data.group_column": "group",
            "data.max_length": 48, "data.max_prompt_length": 24, "experts.num_experts": 2,
            "train.output_dir": str(run), "train.export_format": "compact", "train.export_max_shard_size": SHARD,
            **{f"gate.{k}": v for k, v in gate.items()}}
    cfg = load_config(TINY, [f"{k}={v}" for k, v in over.items()])
    cfg.to_yaml(run / "config.yaml")
    policy = _trained_like(build_policy(model_dir, cfg.experts))
    export_experts(policy, build_gate(cfg.gate, 2, policy.config.hidden_size), str(run / "export"), tokenizer, cfg=cfg)
    return run


def test_evaluate_and_generate_on_a_compact_only_export(tiny_gpt2_dir, tiny_tokenizer, tmp_path):
    run = _compact_run(tmp_path, tiny_gpt2_dir, tiny_tokenizer, {"kind": "moe", "features": "prompt"})
    assert not (run / "export" / "expert_0").exists()
    rows = [{"prompt": f"Question {i}?", "chosen": f" Good answer {i}.", "rejected": f" Bad {i}.",
             "group": "ab"[i % 2]} for i in range(4)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluate_run(str(run), str(data), str(tmp_path / "eval.jsonl"))
    lines = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(len(r["margins"]) == 2 for r in lines)
    fixed = generate(str(run), "Question 1?", expert=1, max_new_tokens=5, greedy=True)
    assert fixed["expert"] == 1 and isinstance(fixed["completion"], str)
    # the same decode from expert 1 built by hand from the compact files (trunk + head 1)
    model = load_expert(str(run / "export"), 1)
    ids = torch.tensor([tiny_tokenizer("Question 1?")["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    assert fixed["completion"] == tiny_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    sampled = generate(str(run), "Question 2?", max_new_tokens=4, seed=3)                # the moe gate reads the trunk
    assert len(sampled["w"]) == 2 and abs(sum(sampled["w"]) - 1) < 1e-5
