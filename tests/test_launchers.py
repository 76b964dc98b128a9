"""The example GPT trains under each way of starting processes: Lightning's own launcher (``python script.py``),
torchrun, and a SLURM allocation (``srun``'s environment, imitated with two processes started by hand)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._launch import free_port

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "examples" / "gpt.py")
ARGS = ["--max-steps", "6", "--batch-size", "8"]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                          "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _check(output: str) -> None:
    assert "final val_loss" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.timeout(240)
def test_lightning_subprocess_launcher(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, SCRIPT, *ARGS, "--log-dir", str(tmp_path)], env=_clean_env(),
                         capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    _check(run.stdout + run.stderr)
    assert list(tmp_path.glob("gpt/version_0/metrics.csv")), "rank 0 wrote the CSV log"


@pytest.mark.timeout(240)
def test_torchrun(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), SCRIPT, *ARGS, "--log-dir", str(tmp_path)]
    run = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    _check(run.stdout + run.stderr)


@pytest.mark.timeout(240)
def test_slurm_environment(tmp_path: Path) -> None:
    port = free_port()
    procs = []
    for rank in range(2):
        env = _clean_env()
        env.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_JOB_ID="4242", SLURM_JOB_NAME="pipeline-test",
                   SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, SCRIPT, *ARGS, "--log-dir", str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=200)[0])
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    _check(outputs[0])
    # Each process took its rank from SLURM (no launcher of Lightning's started extra processes).
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1], outputs[1][-2000:]
