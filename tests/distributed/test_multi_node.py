"""Two nodes on this machine: `launch/multi_node.sh` in its no-ssh mode (NO_SSH=1), started twice, as one would on
two hosts (NODE_RANK 0 and 1, NUM_NODES 2, MASTER_ADDR 127.0.0.1, one CPU rank per node over gloo), runs the real
`mixdpo train` (tiny GPT-2, K = 3 heads, ZeRO-3, micro_batch_size 2 per rank) beside a 1-process run of the same
global batch (ZeRO-0, micro_batch_size 4). Checked: both nodes exit 0; the per-step losses equal the 1-process
run's (1e-5); both ranks wrote their ZeRO-3 shards and RNG state into the one checkpoint, the export holds the
K experts, and the script removed the hostfiles it wrote; no DeepSpeed shm all-reduce buffer appeared while the
nodes ran (DeepSpeed sets one up only when every rank is on one node, LOCAL_SIZE == WORLD_SIZE).

Each launcher runs in its own session (process group) with its output in a log file; on a failure or past the
deadline every group still running is killed and both nodes' logs are printed. Wall time ~1-2 min on 2 shared cores.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ep_worker import clean_env

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "multi_node.sh"
DEADLINE_S = 600.0
RUN = ["train.max_steps=3", "train.save_every=0", "em.warmup_random_steps=1", "train.progress_bar=false",
       "train.plots=false", "train.gradient_clipping=0"]  # step 1: Dirichlet-random responsibilities


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (launcher, node launcher, ranks), SIGKILL what is left after 15 s."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_all(procs: dict[str, subprocess.Popen], deadline_s: float, watch: str, seen: set) -> dict[str, int | None]:
    """Exit codes once all have exited; at the first failure or past the deadline the rest are stopped (None).
    Meanwhile the paths matching the glob `watch` go into `seen` (polled every 0.5 s)."""
    end = time.monotonic() + deadline_s
    while True:
        seen.update(glob.glob(watch))
        codes = {name: p.poll() for name, p in procs.items()}
        if all(c is not None for c in codes.values()):
            return codes
        if any(c not in (None, 0) for c in codes.values()) or time.monotonic() > end:
            for p in procs.values():
                _stop(p)
            return codes
        time.sleep(0.5)


def _logs(logs: dict[str, Path], tail: int = 6000) -> str:
    return "\n".join(f"===== {name} ({path}) =====\n{path.read_text(errors='replace')[-tail:]}"
                     for name, path in logs.items())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, tiny_gpt2_dir):
    """(two-node run dir, 1-process run dir, the shm buffers of the nodes' port seen while they ran); the 1-process
    run goes alongside the two nodes."""
    out = tmp_path_factory.mktemp("multi_node")
    port = _free_port()
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(out),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    model = [f"model.name_or_path={tiny_gpt2_dir}", *RUN]
    train = ["configs/tiny.yaml", *model, f"train.output_dir={out / 'nodes'}", "deepspeed.config=zero3",
             "train.micro_batch_size=2"]
    node_env = {**env, "NO_SSH": "1", "NUM_NODES": "2", "NUM_ACCELERATORS": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)}
    logs = {name: out / f"{name}.log" for name in ("node0", "node1", "one_process")}
    shm, seen = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*", set()
    procs = {}
    try:
        for r in (0, 1):
            procs[f"node{r}"] = _start(["bash", str(SCRIPT), *train], {**node_env, "NODE_RANK": str(r)},
                                       logs[f"node{r}"])
        procs["one_process"] = _start(
            [sys.executable, "-m", "mixdpo_ds.cli", "train", "--config", "configs/tiny.yaml", *model,
             f"train.output_dir={out / 'one_process'}", "deepspeed.config=zero0", "train.micro_batch_size=4"],
            env, logs["one_process"])
        codes = _wait_all(procs, DEADLINE_S, shm, seen)
    finally:
        for p in procs.values():
            _stop(p)
        for path in glob.glob(shm):  # a rank removes its own at exit, a killed one cannot
            os.remove(path)
    assert codes == {name: 0 for name in procs}, f"exit codes {codes} (None: stopped)\n{_logs(logs)}"
    return out / "nodes", out / "one_process", seen


def test_two_nodes_match_one_process(two_nodes):
    nodes, one, _ = two_nodes
    got, want = _metrics(nodes), _metrics(one)
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "policy_loss", "mbt/loglik", "rewards/margins"):
            assert abs(g[key] - w[key]) < 1e-5, (g["step"], key, g[key], w[key])


def test_both_nodes_wrote_their_shards_and_the_export(two_nodes):
    nodes, _, _ = two_nodes
    step = nodes / "checkpoints" / "step_3"
    assert sorted(p.name for p in (step / "engine").glob("zero_pp_rank_*_model_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(2)]
    assert sorted(p.name for p in step.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert sorted(p.name for p in (nodes / "export").glob("expert_*")) == [f"expert_{k}" for k in range(3)]
    assert list(nodes.parent.glob("mixdpo_hostfile.*")) == []  # the script's generated hostfiles (TMPDIR) went


def test_no_shm_buffer_across_nodes(two_nodes):
    """A node-local shared-memory all-reduce cannot span nodes: one rank per node must not create its buffer."""
    assert two_nodes[2] == set()
