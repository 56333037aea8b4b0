"""mixdpo_ds.compat: the third-party private APIs it wraps still exist and behave as the wrappers assume (the first
test to fail after raising a bound in setup.py), and compat imports nothing from mixdpo_ds."""
import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mixdpo_ds import compat


def test_compat_imports_nothing_from_mixdpo_ds():
    tree = ast.parse(Path(compat.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not [m for m in names if m.split(".")[0] == "mixdpo_ds"], names


def test_deepspeed_private_names_exist():
    from deepspeed.moe import sharded_moe
    from deepspeed.utils import groups

    assert issubclass(sharded_moe._AllToAll, torch.autograd.Function)
    for name in ("_get_expert_parallel_group_dict", "_create_expert_and_data_parallel", "_get_expert_parallel_group"):
        assert callable(getattr(groups, name)), name
    plain = nn.Parameter(torch.zeros(3, 4))
    assert not compat.is_zero3_partitioned(plain) and compat.local_numel(plain) == 12
    plain.ds_id, plain.ds_tensor = 7, torch.zeros(5)  # what ZeRO-3 attaches to a partitioned parameter
    assert compat.is_zero3_partitioned(plain) and compat.local_numel(plain) == 5


def test_hf_deepspeed_config_suspended_restores_the_live_config():
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
    from transformers.integrations import deepspeed as hf_ds

    assert hasattr(hf_ds, "_hf_deepspeed_config_weak_ref")
    live = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with compat.hf_deepspeed_config_suspended():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
        with pytest.raises(RuntimeError), compat.hf_deepspeed_config_suspended():
            raise RuntimeError("inside")
        assert is_deepspeed_zero3_enabled()  # restored on an exception too
    finally:
        hf_ds.unset_hf_deepspeed_config()
        del live


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


def test_lora_switches_leave_requires_grad_alone():
    """Adapters `first` and `second` (only second's lora_B nonzero): activating second changes the output,
    disabling gives the base output, and neither switch touches requires_grad (peft's own set_adapter would
    freeze the inactive adapter)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _Tiny()
    x = torch.randn(2, 4)
    expected_base = base(x).detach()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lin"]), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, target_modules=["lin"]))
    layers = compat.lora_layers(model)
    assert len(layers) == 1 and layers[0] is model.base_model.model.lin
    with torch.no_grad():
        layers[0].lora_B["second"].weight.fill_(0.5)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)  # every adapter trainable, as experts._build_lora leaves them
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert grads["base_model.model.lin.lora_B.second.weight"]

    compat.set_lora_active(layers[0], ["first"])
    torch.testing.assert_close(model(x), expected_base)  # lora_B of `first` starts at 0
    compat.set_lora_active(layers[0], ["second"])
    assert layers[0].active_adapters == ["second"]
    assert not torch.allclose(model(x), expected_base)
    compat.set_lora_disabled(layers[0], True)
    assert layers[0].disable_adapters
    torch.testing.assert_close(model(x), expected_base)
    compat.set_lora_disabled(layers[0], False)
    assert not torch.allclose(model(x), expected_base)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_dataset_fingerprint_is_stable_per_source(tmp_path):
    """The reference-logp cache key relies on it: the same file loaded twice has one fingerprint, other data
    another."""
    import datasets

    (tmp_path / "a.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
    (tmp_path / "b.jsonl").write_text('{"x": 1}\n{"x": 3}\n')

    def load(name):
        return datasets.load_dataset("json", data_files={"train": [str(tmp_path / name)]}, split="train",
                                     cache_dir=str(tmp_path / "cache"))

    fp = compat.dataset_fingerprint(load("a.jsonl"))
    assert isinstance(fp, str) and fp == compat.dataset_fingerprint(load("a.jsonl"))
    assert fp != compat.dataset_fingerprint(load("b.jsonl"))
