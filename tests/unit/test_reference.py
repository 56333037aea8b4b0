"""Frozen reference (mixdpo_ds.model.reference): log-probs, per-expert references, the precomputed cache."""
import os

import pytest
import torch
from _experts_testlib import PAD_ID, hf_sequence_logps, make_batch, make_examples
from transformers import AutoModelForCausalLM

from mixdpo_ds.model.experts import ExpertsConfig, build_policy
from mixdpo_ds.model.reference import (
    FrozenReference,
    PolicyReference,
    cache_path,
    precompute_reference_logps,
    reference_cache_key,
)
from mixdpo_ds.training.batch import collate


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory, tiny_tokenizer):
    from mixdpo_ds.apps.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("other_gpt2")), tiny_tokenizer, seed=1)


class CountingReference:
    """Wraps a reference and counts `logps` calls, to show a cache hit runs no model."""

    def __init__(self, reference):
        self.reference, self.calls = reference, 0

    def logps(self, batch):
        self.calls += 1
        return self.reference.logps(batch)


def test_frozen_reference_is_frozen_and_equals_hand_sum(tiny_gpt2_dir):
    ref = FrozenReference(tiny_gpt2_dir, logprob_impl="naive")
    ref.train()
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    batch = make_batch(3)
    out = ref.logps(batch)
    assert out.shape == (6,) and out.dtype == torch.float32
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    torch.testing.assert_close(out, hf_sequence_logps(base, batch), atol=1e-5, rtol=0)


def test_per_expert_references(tiny_gpt2_dir, other_dir):
    batch = make_batch(2)
    per_expert = FrozenReference([tiny_gpt2_dir, other_dir, tiny_gpt2_dir], logprob_impl="naive")
    out = per_expert.logps(batch)
    assert out.shape == (4, 3)
    shared = FrozenReference(tiny_gpt2_dir, logprob_impl="naive").logps(batch)
    torch.testing.assert_close(out[:, 0], shared, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 2], shared, atol=1e-6, rtol=0)
    other = hf_sequence_logps(AutoModelForCausalLM.from_pretrained(other_dir), batch)
    torch.testing.assert_close(out[:, 1], other, atol=1e-5, rtol=0)
    same_paths = FrozenReference([tiny_gpt2_dir] * 3, logprob_impl="naive")   # K equal paths: one shared model
    assert len(same_paths.models) == 1 and same_paths.logps(batch).shape == (4,)


def test_policy_reference_equals_frozen_reference(tiny_gpt2_dir):
    batch = make_batch(3)
    policy = build_policy(tiny_gpt2_dir, ExpertsConfig(num_experts=2, init_noise=0.3, logprob_impl="naive"))
    expected = FrozenReference(tiny_gpt2_dir, logprob_impl="naive").logps(batch)
    torch.testing.assert_close(PolicyReference(policy).logps(batch), expected, atol=1e-6, rtol=0)
    trainable = build_policy(tiny_gpt2_dir, ExpertsConfig(num_experts=2, trunk="trainable"))
    with pytest.raises(ValueError, match="no built-in reference"):
        PolicyReference(trainable)


def test_cache_key_depends_on_every_input():
    args = ("gpt2", "abc123", 512, 256, {"dtype": "float32"})
    key = reference_cache_key(*args)
    assert key == reference_cache_key(*args) and len(key) == 64
    for i, changed in enumerate(("gpt2-medium", "abc124", 513, 255, {"dtype": "bfloat16"})):
        other = list(args)
        other[i] = changed
        assert reference_cache_key(*other) != key


def test_cache_key_follows_the_weights_not_the_path(tiny_gpt2_dir, tmp_path):
    """Retraining a model into the same directory (new weights, same path, same shapes) gives a new key; an
    identical copy at another path gives the same key."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, model)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_gpt2_dir, copy)
    key = reference_cache_key(str(model), "fp", 64, 32, None)
    assert reference_cache_key(str(copy), "fp", 64, 32, None) == key
    weights = model / "model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1e-3  # "retrained": same file name, same size, same tensors' shapes
    save_file(state, weights, metadata={"format": "pt"})
    assert reference_cache_key(str(model), "fp", 64, 32, None) != key


def test_precompute_equals_on_the_fly_and_is_reused(tiny_gpt2_dir, tmp_path):
    """Rows are placed by example["index"] (given out of order here), and a second call reads the file."""
    ref = FrozenReference(tiny_gpt2_dir, logprob_impl="naive")
    examples = make_examples(5, seed=2, indices=[3, 0, 4, 1, 2])
    key = reference_cache_key(tiny_gpt2_dir, "fp", 64, 32, None)
    counting = CountingReference(ref)
    table = precompute_reference_logps(counting, examples, lambda ex: collate(ex, PAD_ID), batch_size=2,
                                       cache_dir=str(tmp_path), key=key)
    assert counting.calls == 3 and table.shape == (5, 2)
    assert os.path.exists(cache_path(str(tmp_path), key))
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []
    for ex in examples:                                   # on the fly, one pair at a time
        lp = ref.logps(collate([ex], PAD_ID))             # (2,) = chosen, rejected
        torch.testing.assert_close(table[ex["index"]], lp, atol=1e-6, rtol=0)
    again = CountingReference(ref)
    cached = precompute_reference_logps(again, examples, lambda ex: collate(ex, PAD_ID), batch_size=2,
                                        cache_dir=str(tmp_path), key=key)
    assert again.calls == 0
    torch.testing.assert_close(cached, table, atol=0, rtol=0)
    fresh = CountingReference(ref)
    precompute_reference_logps(fresh, examples, lambda ex: collate(ex, PAD_ID), batch_size=2,
                               cache_dir=str(tmp_path), key=reference_cache_key(tiny_gpt2_dir, "fp2", 64, 32, None))
    assert fresh.calls == 3                               # another key: computed again


def test_precompute_per_expert_shape(tiny_gpt2_dir, other_dir):
    ref = FrozenReference([tiny_gpt2_dir, other_dir], logprob_impl="naive")
    examples = make_examples(3, seed=4)
    table = precompute_reference_logps(ref, examples, lambda ex: collate(ex, PAD_ID), 2, None, None)
    assert table.shape == (3, 2, 2)
    lp = ref.logps(collate(examples[:1], PAD_ID))          # (2, K): rows chosen, rejected
    torch.testing.assert_close(table[0], lp, atol=1e-6, rtol=0)


def test_a_corrupt_cache_file_is_recomputed(tiny_gpt2_dir, tmp_path, caplog):
    """A truncated cache file is reported and recomputed (the model runs again), not a crash."""
    ref = FrozenReference(tiny_gpt2_dir, logprob_impl="naive")
    examples = make_examples(4, seed=3)
    key = reference_cache_key(tiny_gpt2_dir, "fp-corrupt", 64, 32, None)
    fresh = precompute_reference_logps(ref, examples, lambda ex: collate(ex, PAD_ID), batch_size=2,
                                       cache_dir=str(tmp_path), key=key)
    path = cache_path(str(tmp_path), key)
    with open(path, "r+b") as f:
        f.truncate(20)
    counting = CountingReference(ref)
    again = precompute_reference_logps(counting, examples, lambda ex: collate(ex, PAD_ID), batch_size=2,
                                       cache_dir=str(tmp_path), key=key)
    assert counting.calls == 2 and "is unreadable" in caplog.text
    torch.testing.assert_close(again, fresh)
