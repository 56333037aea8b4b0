"""launch/: every script parses, documents its exact command, and starts `mixdpo_ds.cli train`; the CPU smoke
script runs end to end on 2 CPU ranks (the real `deepspeed` launcher and the real CLI)."""
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
    assert "mixdpo_ds.cli train --config" in text.split("set -euo pipefail")[1], name


@pytest.mark.slow
def test_cpu_smoke_two_ranks(tmp_path):
    env = {**clean_env(), "WORK": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(LAUNCH / "cpu_smoke.sh"), "train.max_steps=2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert sorted(p.name for p in (tmp_path / "run" / "export").glob("expert_*")) == [f"expert_{k}" for k in range(3)]
