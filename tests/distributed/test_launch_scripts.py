"""launch/: every script parses, documents its exact command, and starts `mixdpo_ds.cli train`; the CPU smoke
script runs end to end on 2 CPU ranks (the real `deepspeed` launcher and the real CLI). multi_node.sh (both modes)
and slurm.sbatch (under stand-in `srun` / `scontrol`) print the exact launcher command with DRY_RUN=1; the real
two-node run through multi_node.sh is tests/distributed/test_multi_node.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ep_worker import clean_env

pytestmark = pytest.mark.distributed

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
SCRIPTS = ["single_node.sh", "multi_node.sh", "slurm.sbatch", "cpu_smoke.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_syntax_and_header(name):
    path = LAUNCH / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    header = text.split("set -euo pipefail")[0]
    assert "runs exactly" in header and "mixdpo_ds.cli train --config" in header, name
    body = text.split("set -euo pipefail")[1]
    # slurm.sbatch starts multi_node.sh on every node (its header shows the command that runs there)
    assert "mixdpo_ds.cli train --config" in body or "launch/multi_node.sh" in body, name


@pytest.mark.slow
def test_cpu_smoke_two_ranks(tmp_path):
    env = {**clean_env(), "WORK": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(LAUNCH / "cpu_smoke.sh"), "train.max_steps=2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert sorted(p.name for p in (tmp_path / "run" / "export").glob("expert_*")) == [f"expert_{k}" for k in range(3)]


def _run(script: str, args: list[str], tmp_path: Path, path_prefix: str = "", **env: str):
    env = {**clean_env(), "DRY_RUN": "1", "TMPDIR": str(tmp_path),
           "PATH": f"{path_prefix}{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=LAUNCH.parent, env=env, capture_output=True,
                          text=True, timeout=120)


def _commands(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.startswith("deepspeed ")]


def test_multi_node_no_ssh_dry_run(tmp_path):
    """NO_SSH=1 without HOSTFILE: a NUM_NODES-line hostfile (removed at exit), this node's --node_rank, no pdsh."""
    proc = _run("multi_node.sh", ["configs/tiny.yaml", "a.b=1", "c=d e"], tmp_path, NO_SSH="1", NODE_RANK="2",
                NUM_NODES="3", NUM_ACCELERATORS="4", MASTER_ADDR="10.0.0.1", MASTER_PORT="29600")
    assert proc.returncode == 0, proc.stderr
    hostfile = [line for line in proc.stdout.splitlines() if line.startswith("# hostfile: ")]
    assert hostfile == [f"# hostfile: node{i} slots=4" for i in range(3)]
    [cmd] = _commands(proc.stdout)
    path = cmd.split()[2]
    assert Path(path).parent == tmp_path and not Path(path).exists()  # the trap removed it
    assert cmd == (f"deepspeed --hostfile {path} --no_ssh --node_rank 2 --master_addr 10.0.0.1 --master_port 29600 "
                   r"--no_local_rank --module mixdpo_ds.cli train --config configs/tiny.yaml a.b=1 c=d\ e")


def test_multi_node_no_ssh_given_hostfile_and_pdsh_mode(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\ngpu-a slots=8\n\ngpu-b slots=8\n")
    proc = _run("multi_node.sh", ["c.yaml"], tmp_path, NO_SSH="1", NODE_RANK="1", MASTER_ADDR="gpu-a",
                HOSTFILE=str(hostfile))
    assert proc.returncode == 0, proc.stderr
    tail = "--master_port 29500 --no_local_rank --module mixdpo_ds.cli train --config c.yaml"
    want = f"deepspeed --hostfile {hostfile} --no_ssh --node_rank 1 --master_addr gpu-a {tail}"
    assert _commands(proc.stdout) == [want]
    assert hostfile.exists()  # the user's hostfile is never removed
    proc = _run("multi_node.sh", ["c.yaml", "x=1"], tmp_path, HOSTFILE=str(hostfile))  # pdsh: MASTER_ADDR = 1st host
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc.stdout) == [f"deepspeed --hostfile {hostfile} --launcher pdsh --master_addr gpu-a {tail} x=1"]


@pytest.mark.parametrize(("env", "message"), [
    ({"NODE_RANK": "2", "NUM_NODES": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2: allowed 0 .. 1"),
    ({"NODE_RANK": "x", "NUM_NODES": "2", "MASTER_ADDR": "h"}, "NODE_RANK=x: allowed 0 .. 1"),
    ({"NUM_NODES": "2", "MASTER_ADDR": "h"}, "needs NODE_RANK"),
    ({"NODE_RANK": "0", "NUM_NODES": "2"}, "needs MASTER_ADDR"),
    ({"NODE_RANK": "0", "MASTER_ADDR": "h"}, "needs NUM_NODES"),
    ({"NODE_RANK": "0", "NUM_NODES": "two", "MASTER_ADDR": "h"}, "NUM_NODES=two: allowed a whole number >= 1"),
])
def test_multi_node_no_ssh_errors_name_the_variable(tmp_path, env, message):
    proc = _run("multi_node.sh", ["c.yaml"], tmp_path, NO_SSH="1", NUM_ACCELERATORS="1", **env)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # no hostfile left behind on an error either


def test_slurm_sbatch_one_launcher_per_node(tmp_path):
    """Stand-in `srun` (each "node" in turn, SLURM_NODEID set, printing OMP_NUM_THREADS) and `scontrol`: every node
    runs multi_node.sh without ssh with its node rank, the job's first host as MASTER_ADDR."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                  'echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"\n'
                                  'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit; done\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr , "\\n"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    proc = _run("slurm.sbatch", ["configs/llama.yaml", "deepspeed.config=zero3"], tmp_path, f"{bin_dir}:",
                SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-a,gpu-b", SLURM_CPUS_PER_TASK="16", NUM_ACCELERATORS="4")
    assert proc.returncode == 0, proc.stderr
    assert "OMP_NUM_THREADS=4" in proc.stdout  # 16 CPUs / 4 ranks per node
    cmds = _commands(proc.stdout)
    assert [c.split()[5] for c in cmds] == ["0", "1"], cmds  # the value of --node_rank
    for cmd in cmds:
        assert " --no_ssh " in cmd and " --master_addr gpu-a --master_port 29500 " in cmd, cmd
        assert cmd.endswith("--module mixdpo_ds.cli train --config configs/llama.yaml deepspeed.config=zero3"), cmd
    assert proc.stdout.count("# hostfile: node1 slots=4") == 2
