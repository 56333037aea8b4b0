"""`mixdpo train` (MixDPOTrainer) on 2 CPU ranks under the real `deepspeed` launcher.

Two launcher starts serve every test (a start costs 15-30 s): one single-process run of the 1-rank ZeRO-0
references, one 2-rank run of ZeRO-2, ZeRO-3, MoE-DPO gates (one pre-trained, with λ_global) and Gumbel mode at
ZeRO-2, K LoRA adapters at ZeRO-2 and ZeRO-3, and expert parallel (ep_size=2, ZeRO-2; also interrupted at step 2
and resumed). Each rank draws the same global batch and keeps its half
(micro_batch_size 2 × 2 ranks = the reference's 4) and its rows of the global warm-up responsibilities
(step 1); fp32, gradient clipping off, AdamW. Checked: per-step losses equal the 1-rank run (1e-5); the
ZeRO-3 export loads with `from_pretrained` and reproduces the engine's log-probs; expert parallel matches
dense K=4 (1e-6), halves the heads' bytes per rank, writes one checkpoint file per expert, and resume
equals the uninterrupted run. With AdamW a wrong gradient *scale* barely changes an update; the SGD checks
of that are in test_expert_parallel.py.
"""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ep_worker import clean_env

pytestmark = pytest.mark.distributed

WORKER = str(Path(__file__).with_name("trainer_worker.py"))
ROOT = Path(__file__).resolve().parents[2]
STEPS = "train.max_steps=3,train.save_every=0,em.warmup_random_steps=1"  # step 1: Dirichlet-random resp
# gating network, refresh + gate step; λ_global · KL(w̄ ‖ U) needs the global batch's w̄ (a differentiable all-reduce)
MOE = "gate.kind=moe,em.gate_update=alternate,em.lambda_global=1.0,train.export=false"
# the prompt gate pre-trained on the objective label: confident w that differ between the ranks' shards, so a
# rank-local w̄ in λ_global · KL(w̄ ‖ U) would not match the 1-rank run (untrained, w stays near uniform in 3 steps)
MOEU = f"{MOE},gate.pretrain_steps=300,gate.pretrain_label_column=objective"
# K LoRA adapters on one frozen base
LORA = "experts.kind=lora,experts.lora_r=4,experts.init_noise=0.5,train.export=false"
GUMBEL = "em.mode=gumbel,em.gumbel.samples=2,train.export=false"  # Gumbel noise: global draws, rank's rows
EP = "deepspeed.config=zero2,train.micro_batch_size=2,experts.num_experts=4,experts.ep_size=2"
# grad_accum = 2, micro_batch = 1 on 2 ranks against grad_accum = 1, micro_batch = 4 on 1 rank (the same 4 pairs per
# optimizer step): the gate's work runs once per optimizer step on the global batch (docs/math.md §9). Settings as
# in tests/integration/test_grad_accum.py, which explains them (gate.trust_region off: its step length amplifies
# fp32 rounding while the experts are alike; that test checks it with the region on, at its own tolerance).
GA = ("deepspeed.config=zero0,experts.num_experts=3,experts.init_noise=0.3,experts.trunk=trainable,train.lr=1e-3,"
      "train.max_steps=3,train.export=false,loss.beta=0.1,gate.lr=0.01,train.adam_epsilon=1e-2,"
      "gate.trust_region=0.0")
GA_MODES = {"gam": "gate.kind=mix", "gar": "gate.kind=mix,em.refresh=true",
            "gaj": "gate.kind=moe,em.gate_update=joint,em.lambda_global=0.5",
            "gaa": "gate.kind=moe,em.gate_update=alternate,em.lambda_global=0.5"}
REFS = [f"ref3:deepspeed.config=zero0,train.micro_batch_size=4,{STEPS}",
        "ref4:deepspeed.config=zero0,train.micro_batch_size=4,experts.num_experts=4,train.max_steps=4",
        f"refm:deepspeed.config=zero0,train.micro_batch_size=4,{MOE},{STEPS}",
        f"refg:deepspeed.config=zero0,train.micro_batch_size=4,{GUMBEL},{STEPS}",
        f"refu:deepspeed.config=zero0,train.micro_batch_size=4,{MOEU},{STEPS}",
        f"refl:deepspeed.config=zero0,train.micro_batch_size=4,{LORA},{STEPS}",
        *[f"{name}:{GA},{mode},train.micro_batch_size=4,train.grad_accum=1" for name, mode in GA_MODES.items()]]
DIST = [f"z2:deepspeed.config=zero2,train.micro_batch_size=2,{STEPS}",
        f"zm:deepspeed.config=zero2,train.micro_batch_size=2,{MOE},{STEPS}",
        f"zg:deepspeed.config=zero2,train.micro_batch_size=2,{GUMBEL},{STEPS}",
        f"zu:deepspeed.config=zero2,train.micro_batch_size=2,{MOEU},{STEPS}",
        f"z3:deepspeed.config=zero3,train.micro_batch_size=2,{STEPS}",
        f"l3:deepspeed.config=zero3,train.micro_batch_size=2,{LORA},{STEPS}",
        f"l2:deepspeed.config=zero2,train.micro_batch_size=2,{LORA},{STEPS}",
        f"ep2:{EP},train.max_steps=4,train.save_every=2,train.keep_last=0",
        # resumed from ep2's step-2 checkpoint (same run settings; only the output directory differs) to step 4
        f"ep2r:{EP},train.max_steps=4,train.export=false,train.resume_from={{out}}/ep2/checkpoints/step_2",
        *[f"{name}2:{GA},{mode},train.micro_batch_size=1,train.grad_accum=2" for name, mode in GA_MODES.items()]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    out = tmp_path_factory.mktemp("dist_runs")
    _launch(out, tiny_gpt2_dir, REFS, 1)
    _launch(out, tiny_gpt2_dir, DIST, 2)
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ranks(run: Path) -> list[dict]:
    return [json.loads((run / f"rank{r}.json").read_text()) for r in range(2) if (run / f"rank{r}.json").exists()]


def _assert_losses_match(run: Path, ref: Path, tol: float) -> None:
    got, want = _metrics(run), _metrics(ref)
    assert [m["step"] for m in got] == [m["step"] for m in want] and len(got) >= 3
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "policy_loss", "mbt/loglik", "rewards/margins"):
            assert abs(g[key] - w[key]) < tol, (run.name, g["step"], key, g[key], w[key])


@pytest.mark.parametrize("name", ["z2", "z3"])
def test_two_ranks_match_one_rank(runs, name):
    _assert_losses_match(runs / name, runs / "ref3", 1e-5)


def test_moe_gate_two_ranks_match_one_rank(runs):
    """MoE-DPO gate (prompt features -> w), alternate updates, λ_global = 1: the gate's gradients are averaged over
    ranks by hand (it is outside the engine) and KL(w̄ ‖ U) uses the global batch's w̄; its loss and the policy's
    must follow the 1-rank run."""
    _assert_losses_match(runs / "zm", runs / "refm", 1e-5)
    for g, w in zip(_metrics(runs / "zm"), _metrics(runs / "refm"), strict=True):
        assert abs(g["gate_loss"] - w["gate_loss"]) < 1e-5 and abs(g["gate/entropy"] - w["gate/entropy"]) < 1e-5


def test_pretrained_gate_global_kl_two_ranks_match_one_rank(runs):
    """λ_global · KL(w̄ ‖ U) with a confident (pre-trained) gate: w̄ is the global batch's (a differentiable all-reduce),
    so the gate loss and the policy's follow the 1-rank run, and the KL term is far from 0 (a real check)."""
    _assert_losses_match(runs / "zu", runs / "refu", 1e-5)
    for g, w in zip(_metrics(runs / "zu"), _metrics(runs / "refu"), strict=True):
        assert abs(g["gate_loss"] - w["gate_loss"]) < 1e-5, (g["step"], g["gate_loss"], w["gate_loss"])


def test_gumbel_two_ranks_match_one_rank(runs):
    _assert_losses_match(runs / "zg", runs / "refg", 1e-5)


@pytest.mark.parametrize("name", ["l2", "l3"])
def test_lora_two_ranks_match_one_rank(runs, name):
    """K = 3 LoRA adapters on 2 ranks, ZeRO-2 and ZeRO-3 (base weights partitioned at load; the reference is a
    replicated frozen base there, the base with adapters off in the 1-rank run): per-step losses follow the 1-rank
    ZeRO-0 run. This caught three bugs: NaN init noise under ZeRO-3 (std of a partitioned, empty base weight), a
    ZeRO-2 crash at the first backward, and, in every LoRA run, peft's adapter switching leaving all but one
    adapter without gradients (step 2 differed by 5e-5 from the ZeRO-3 run, which has no such switching)."""
    _assert_losses_match(runs / name, runs / "refl", 1e-5)


def test_zero3_export_matches_in_training_logps(runs):
    diffs = [r["export_max_diff"] for r in _ranks(runs / "z3")]
    assert len(diffs) == 2 and max(diffs) < 1e-6, diffs  # relative to |log-prob|
    assert sorted(p.name for p in (runs / "z3" / "export").glob("expert_*")) == ["expert_0", "expert_1", "expert_2"]


def test_expert_parallel_matches_dense_and_halves_head_bytes(runs, capsys):
    _assert_losses_match(runs / "ep2", runs / "ref4", 1e-6)
    import torch

    ep, ref = torch.load(runs / "ep2" / "final_logps.pt"), torch.load(runs / "ref4" / "final_logps.pt")
    assert ep["indices"][:2] == ref["indices"][:2]  # rank 0's shard = the reference's 2 pairs
    torch.testing.assert_close(ep["logps"][:4], ref["logps"], rtol=1e-6, atol=1e-5)  # rows: 2 chosen, 2 rejected
    ep_bytes = [r["head_param_bytes"] for r in _ranks(runs / "ep2")]
    dense_bytes = _ranks(runs / "ref4")[0]["head_param_bytes"]
    with capsys.disabled():
        print(f"\n[trainer] head parameter bytes per rank: dense K=4 {dense_bytes}, ep_size=2 {ep_bytes}")
    assert ep_bytes == [dense_bytes // 2] * 2
    assert max(r["export_max_diff"] for r in _ranks(runs / "ep2")) < 1e-6
    final = runs / "ep2" / "checkpoints" / "step_4"
    assert sorted(p.name for p in final.rglob("layer_0_expert_*_model_states.pt")) == [
        f"layer_0_expert_{k}_mp_rank_00_model_states.pt" for k in range(4)]


def test_expert_parallel_resume_equals_uninterrupted(runs):
    """ep2: 4 steps in one go with a checkpoint at step 2; ep2r: a new trainer resumes from that checkpoint."""
    resumed, straight = _metrics(runs / "ep2r"), _metrics(runs / "ep2")
    assert [m["step"] for m in resumed] == [3, 4]
    for r, s in zip(resumed, straight[2:], strict=True):
        assert r["loss"] == s["loss"] and r["policy_loss"] == s["policy_loss"], (r["step"], r["loss"], s["loss"])


@pytest.mark.parametrize("name", list(GA_MODES))
def test_grad_accum_two_ranks_equal_one_big_batch(runs, name):
    """Mix weights, gate parameters and every trainable policy parameter after 3 steps: 2 ranks × grad_accum 2 ×
    micro-batch 1 equal 1 rank × micro-batch 4 (≤ 1e-6, fp32)."""
    import torch

    got, want = torch.load(runs / f"{name}2" / "final_state.pt"), torch.load(runs / name / "final_state.pt")
    assert got["gate"].keys() == want["gate"].keys() and got["policy"].keys() == want["policy"].keys()
    for k in want["gate"]:
        torch.testing.assert_close(got["gate"][k], want["gate"][k], atol=1e-6, rtol=0, msg=f"gate {k}")
    for n in want["policy"]:
        torch.testing.assert_close(got["policy"][n], want["policy"][n], atol=1e-6, rtol=0, msg=n)
