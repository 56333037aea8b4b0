"""training/memory.py: the per-rank tensor bytes are counted exactly (hand-computed sizes) and written per stage."""
import json

import torch

from mixdpo_ds.training.memory import tensor_bytes, write_memory_report


def _model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False))  # 12+4 and 8 params
    model[1].weight.requires_grad_(False)
    return model


def test_tensor_bytes_counts_params_grads_and_adam_states():
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = tensor_bytes(model, opt)
    assert before == {"param_bytes": 24 * 4, "trainable_param_bytes": 16 * 4, "grad_bytes": 0,
                      "optimizer_state_bytes": 0, "master_weight_bytes": 0}
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    after = tensor_bytes(model, opt)
    # AdamW: exp_avg + exp_avg_sq per trainable value (the 0-dim step counters are not counted); its params are the
    # model's own, so no master weights
    assert after["grad_bytes"] == 16 * 4 and after["optimizer_state_bytes"] == 2 * 16 * 4
    assert after["master_weight_bytes"] == 0


def test_master_weights_are_the_optimizers_own_copies():
    model = _model()
    master = [p.detach().clone().double().requires_grad_() for p in model.parameters() if p.requires_grad]

    class Wrapper:  # DeepSpeed's ZeRO optimizers hold the torch optimizer as .optimizer
        optimizer = torch.optim.SGD(master, lr=0.1)

    assert tensor_bytes(model, Wrapper())["master_weight_bytes"] == 16 * 8


def test_partitioned_parameters_count_their_shard():
    model = _model()
    model[0].weight.ds_tensor = torch.zeros(6)  # a ZeRO-3 partition: half of the 12 values
    assert tensor_bytes(model)["param_bytes"] == (6 + 4 + 8) * 4


def test_report_keeps_every_stage(tmp_path):
    write_memory_report(tmp_path, 1, "setup", _model())
    write_memory_report(tmp_path, 1, "trained")
    report = json.loads((tmp_path / "memory" / "rank1.json").read_text())
    assert set(report) == {"setup", "trained"} and report["setup"]["param_bytes"] == 96
    assert report["trained"]["peak_rss_mib"] >= report["trained"]["rss_mib"] > 0


def test_each_stage_has_its_own_peak(tmp_path):
    write_memory_report(tmp_path, 0, "setup")
    blob = bytearray(200 << 20)  # touch 200 MiB, then free it: the next stage's peak sees it, the one after not
    blob[:: 4096] = b"x" * len(blob[:: 4096])
    del blob
    second = write_memory_report(tmp_path, 0, "trained")
    third = write_memory_report(tmp_path, 0, "exported")
    assert second["peak_rss_mib"] - third["peak_rss_mib"] > 150


def test_release_free_heap_returns_freed_small_allocations():
    import sys

    from mixdpo_ds.training.memory import release_free_heap, rss_mib

    if not sys.platform.startswith("linux"):
        return
    chunks = [bytearray(64 << 10) for _ in range(3000)]  # ~190 MiB of small (< mmap threshold) heap blocks
    for c in chunks:
        c[::4096] = b"x" * len(c[::4096])
    del chunks[1:]  # freed, but glibc keeps the pages behind the one block still in use at the heap's start
    before = rss_mib()
    assert release_free_heap()
    after = rss_mib()
    assert before - after > 100  # what free() alone kept resident


def test_zero_flat_fp32_partitions_count_when_they_are_copies():
    """ZeRO-3 keeps its fp32 flat partitions (`fp32_partitioned_groups_flat`) outside the torch optimizer between
    steps: a copy of the model's partitions counts as master weights, an alias of them does not."""
    model = _model()
    flat = torch.zeros(12 + 4)                              # the model's flat partition of the trainable 16 values
    model[0].weight.ds_tensor, model[0].bias.ds_tensor = flat.narrow(0, 0, 12), flat.narrow(0, 12, 4)

    class Zero3:
        def __init__(self, fp32):
            self.fp32_partitioned_groups_flat = [fp32]
            self.optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.1)

    copy = tensor_bytes(model, Zero3(flat.clone().double()))
    assert copy["master_weight_bytes"] == 16 * 8 + 1 * 4    # the copy + the stand-in optimizer's own parameter
    alias = tensor_bytes(model, Zero3(flat))
    assert alias["master_weight_bytes"] == 1 * 4


_HEAP_PROBE = """
import sys, torch
from mixdpo_ds.training.memory import mmap_large_allocations, rss_mib
if sys.argv[1] == "mmap":
    assert mmap_large_allocations(4 << 20)
torch.ones(6 << 20)                                # 24 MiB, mmapped and freed: glibc raises its threshold to 24 MiB
blocks = [torch.ones(2 << 20) for _ in range(40)]  # 40 x 8 MiB, touched
pin = torch.ones(1 << 18)                          # 1 MiB on the heap after them: the heap's top cannot shrink
before = rss_mib()
del blocks
print(before - rss_mib())
"""


def test_mmap_large_allocations_returns_freed_tensors_at_once():
    """glibc's default keeps freed 8 MiB tensors resident once a larger block was freed; with the threshold at 4 MiB
    each one is its own mapping and leaves the RSS when freed (what train.host_mmap_threshold_mb sets on CPU)."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        return
    returned = {mode: float(subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True,
                                           check=True).stdout.split()[-1]) for mode in ("default", "mmap")}
    assert returned["mmap"] > 280, returned        # 320 MiB freed, all of it handed back
    assert returned["default"] < 100, returned     # glibc kept it
