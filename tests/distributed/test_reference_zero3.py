"""The reference under ZeRO-3 on 2 CPU ranks (the real `deepspeed` launcher): never a replicated full copy.

Two launcher starts: one single-process run of the 1-rank ZeRO-0 references, one 2-rank ZeRO-3 run of
- frozen-trunk heads and K LoRA adapters, each with train.reference=model and =precompute: the policy is its own
  reference, computed through the policy's engine (`EngineReference(builtin=True)`; the precomputed tables by both
  ranks, each its share);
- `models` experts, whose reference is the base model: an optimizer-less ZeRO-3 engine of the partitioned base.
Each rank draws the same global batch and keeps its half (micro_batch_size 2 × 2 ranks = the reference's 4); fp32,
gradient clipping off. Checked: per-step losses equal the 1-rank run (1e-5); a resumed ZeRO-3 lora run with
precomputed tables equals the uninterrupted one; no FrozenReference is built for the
built-in ones; the base model's reference holds only its ZeRO-3 partitions on each rank (about half its bytes) and
none of its weights outside a forward, while the 1-rank run holds it whole (the property can fail). The engine
JSON is ds_configs/zero3.json with stage3_param_persistence_threshold 0: the tiny model's tensors would otherwise
all stay gathered (persistent) after their first forward. The lora and `models` runs train with gradient
checkpointing (train.gradient_checkpointing 'auto'), non-reentrant also over ZeRO-3's partitioned frozen base.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from ep_worker import clean_env
from test_trainer_distributed import ROOT, _assert_losses_match, _free_port, _metrics

pytestmark = pytest.mark.distributed

WORKER = str(Path(__file__).with_name("reference_worker.py"))
STEPS = "train.max_steps=3,train.save_every=0,em.warmup_random_steps=1"
LORA = "experts.kind=lora,experts.lora_r=4,experts.init_noise=0.5"
MODELS = "experts.kind=models,experts.num_experts=2,experts.init_noise=0.05,train.lr=1e-3"
KINDS = {"h": "experts.kind=heads", "l": LORA, "m": MODELS}
Z3 = "deepspeed.config={out}/zero3_nopersist.json,train.micro_batch_size=2"
REFS = [f"{k}ref:deepspeed.config=zero0,train.micro_batch_size=4,{kind},{STEPS}" for k, kind in KINDS.items()]
DIST = [f"{k}3{mode[0]}:{Z3},{kind},train.reference={mode},{STEPS}"
        for k, kind in KINDS.items() for mode in ("model", "precompute")]
# lora, precompute: 4 steps with a checkpoint at step 2, and a new trainer resumed from it (another output dir, so
# its set-up computes the tables again, through the engine, before the checkpoint is loaded)
RESUME = f"{Z3},{LORA},train.reference=precompute,train.max_steps=4,em.warmup_random_steps=1"
DIST += [f"l3s:{RESUME},train.save_every=2,train.keep_last=0",
         f"l3r:{RESUME},train.save_every=0,train.resume_from={{out}}/l3s/checkpoints/step_2"]


def _launch(out: Path, model: str, specs: list[str], nprocs: int) -> None:
    args = [WORKER, str(out), model, *specs]
    cmd = [sys.executable, *args] if nprocs == 1 else [
        str(Path(sys.executable).with_name("deepspeed")), "--num_accelerators", str(nprocs),
        "--master_port", str(_free_port()), "--no_local_rank", *args]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_gpt2_dir) -> Path:
    out = tmp_path_factory.mktemp("ref_zero3_runs")
    engine = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    engine["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (out / "zero3_nopersist.json").write_text(json.dumps(engine))
    _launch(out, tiny_gpt2_dir, REFS, 1)
    _launch(out, tiny_gpt2_dir, DIST, 2)
    return out


def _facts(run: Path) -> list[dict]:
    return [json.loads((run / f"rank{r}.json").read_text()) for r in range(2) if (run / f"rank{r}.json").exists()]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", ["m", "p"])
def test_zero3_reference_two_ranks_match_one_rank(runs, kind, mode):
    _assert_losses_match(runs / f"{kind}3{mode}", runs / f"{kind}ref", 1e-5)


def test_zero3_precompute_resume_equals_uninterrupted(runs):
    resumed, straight = _metrics(runs / "l3r"), _metrics(runs / "l3s")
    assert [m["step"] for m in resumed] == [3, 4] and len(straight) == 4
    for r, s in zip(resumed, straight[2:], strict=True):
        assert r["loss"] == s["loss"] and r["policy_loss"] == s["policy_loss"], (r["step"], r["loss"], s["loss"])


@pytest.mark.parametrize("kind", ["h", "l"])
def test_builtin_reference_runs_through_the_policy_engine(runs, kind):
    """Frozen-trunk heads / lora under ZeRO-3: no second model on any rank; reference=model runs the policy's
    engine in reference mode, precompute leaves only the tables."""
    online, tables = _facts(runs / f"{kind}3m"), _facts(runs / f"{kind}3p")
    assert len(online) == len(tables) == 2
    for f in online:
        assert f["frozen_references"] == 0 and f["reference"] == "EngineReference" and f["policy_engine"], f
    for f in tables:
        assert f["frozen_references"] == 0 and f["reference"] is None and f["tables"], f


def test_base_model_reference_is_sharded_not_replicated(runs):
    """`models` experts under ZeRO-3: the reference is an engine of its own whose weights each rank holds only as
    its partition (ceil(n / 2) elements of every tensor), and none of them materialised between forwards."""
    (one,) = _facts(runs / "mref")
    assert one["frozen_references"] == 1 and one["held_bytes"] == one["materialised_bytes"] == one["full_bytes"]
    sharded = _facts(runs / "m3m")
    assert len(sharded) == 2
    for f in sharded:
        assert f["reference"] == "EngineReference" and not f["policy_engine"] and f["frozen_references"] == 1, f
        assert f["full_bytes"] == one["full_bytes"] and f["materialised_bytes"] == 0, f
        assert abs(2 * f["held_bytes"] - f["full_bytes"]) <= 2 * 4 * f["num_params"], f  # fp32, per-tensor padding
    assert sum(f["held_bytes"] for f in sharded) >= one["full_bytes"]
    for f in _facts(runs / "m3p"):
        assert f["reference"] is None and f["tables"], f
