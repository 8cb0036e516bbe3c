"""Launching a test worker under ``torchrun --nproc_per_node=N`` (gloo, CPU), killed whole on
a timeout so that a deadlock (mismatched collectives) fails the test instead of hanging it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers.live_server import free_port

TESTS = Path(__file__).parents[1]


def torchrun(
    worker: Path, *args: str, nproc: int = 2, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Runs ``worker`` on ``nproc`` local ranks (one torch thread each) and returns the
    finished process; raises ``TimeoutError`` after ``timeout`` seconds, every rank killed."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(worker),
        *args,
    ]
    # its own process group, so that a hang is killed with every rank
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise TimeoutError(
            f"torchrun {worker.name} did not finish in {timeout} s (deadlock?)\n{stderr[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
