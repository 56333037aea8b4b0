"""The streamed export under ZeRO-3 on 2 CPU ranks (the real `deepspeed` launcher, one start for all runs).

Every parameter is partitioned (persistence threshold 0), each run trains 3 steps and exports with every
`GatheredParameters` counted (tests/distributed/export_worker.py). Checked: the exported experts load with
`from_pretrained` (lora: the adapters through peft, and the merged models) and the compact export with
`load_compact`, and all reproduce the engine's log-probs (1e-6 relative); the export gathered one module at a time
(the peak of elements gathered at once is at most one module's own parameters or one head's inputs, far below the
model), with the same number of gathers on both ranks.
"""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ep_worker import clean_env

pytestmark = pytest.mark.distributed

WORKER = str(Path(__file__).with_name("export_worker.py"))
ROOT = Path(__file__).resolve().parents[2]
SHARDS = "train.export_format=both,train.export_max_shard_size=20KB"
RUNS = [f"heads:{SHARDS}",                                                        # K = 3 full heads, frozen trunk
        f"lowrank:{SHARDS},experts.head_rank=2,experts.trunk=trainable",          # W: the tied input embedding
        "models:experts.kind=models,experts.num_experts=2,train.export_max_shard_size=20KB",
        # K = 3 adapters (gathered per adapter) and merged/expert_k (a LoRA layer gathered with adapter k's A, B)
        "lora:experts.kind=lora,experts.lora_r=4,experts.init_noise=0.5,train.export_merged=true,"
        "train.export_max_shard_size=20KB"]
NAMES = ["heads", "lowrank", "models", "lora"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_gpt2_dir) -> Path:
    out = tmp_path_factory.mktemp("export_zero3")
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_accelerators", "2", "--master_port",
           str(_free_port()), "--no_local_rank", WORKER, str(out), tiny_gpt2_dir, *RUNS]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return out


def _ranks(run: Path) -> list[dict]:
    return [json.loads((run / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", NAMES)
def test_zero3_export_reproduces_the_engine_logps(runs, name):
    ranks = _ranks(runs / name)
    for r in ranks:
        assert r["experts_diff"] < 1e-6, (name, r)
        if name in ("heads", "lowrank"):
            assert r["layout"] == ["experts", "compact"] and r["compact_diff"] < 1e-6, (name, r)
    export = runs / name / "export"
    experts = sorted(p.name for p in export.glob("expert_*"))
    assert experts == [f"expert_{k}" for k in range(len(experts))] and len(experts) in (2, 3)
    models = "merged/" if name == "lora" else ""    # lora: expert_k is the adapter alone
    if name == "lora":
        assert all((export / f"expert_{k}" / "adapter_model.safetensors").is_file() for k in range(len(experts)))
    for k in range(len(experts)):   # 20 KB shards: several files and transformers' index
        index = json.loads((export / f"{models}expert_{k}" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 3


@pytest.mark.parametrize("name", NAMES)
def test_zero3_export_gathers_one_module_at_a_time(runs, name, capsys):
    ranks = _ranks(runs / name)
    with capsys.disabled():
        print(f"\n[export zero3] {name}: peak gathered {ranks[0]['peak']:,} of {ranks[0]['total']:,} elements "
              f"(one module / head at most {ranks[0]['bound']:,}), {ranks[0]['calls']} gathers")
    assert ranks[0]["calls"] == ranks[1]["calls"]                     # the same collectives on both ranks
    for r in ranks:
        assert 0 < r["peak"] <= r["bound"] < r["total"], r
        assert r["calls"] >= r["modules"], r                          # at least one gather per module
