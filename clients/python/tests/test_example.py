"""examples/ddp_ghm.py runs with 2 processes against the test server, and every rank receives
the same table at every step, while per-rank local GHM gives the ranks different ones."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import CLIENT_ROOT, REPO_ROOT


def test_ddp_example_with_two_processes(address, job_id):
    steps = 3
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "ddp_ghm.py"), "--address", address,
         "--nproc", "2", "--steps", str(steps), "--job-id", job_id],
        env={**os.environ, "PYTHONPATH": str(CLIENT_ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("every rank got the same table: yes") == steps, run.stdout
    assert "NO" not in run.stdout
    shared = re.findall(r"ghmd, every rank :(.*)", run.stdout)
    local = [re.findall(rf"local, rank {rank}\s*:(.*)", run.stdout) for rank in (0, 1)]
    assert len(shared) == len(local[0]) == len(local[1]) == steps
    # The ranks draw different shards: their own densities disagree, the shared one is one.
    assert local[0] != local[1]
