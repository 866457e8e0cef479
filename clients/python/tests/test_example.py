"""The DDP examples run with 2 processes against the test server: with examples/ddp_ghm.py every
rank receives the same table at every step, while per-rank local GHM gives the ranks different
ones; with examples/ddp_seesaw.py every rank weighs with the same counts, which local Seesaw
would not."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import CLIENT_ROOT, REPO_ROOT


def run_example(name, address, job_id, steps):
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / name), "--address", address,
         "--nproc", "2", "--steps", str(steps), "--job-id", job_id],
        env={**os.environ, "PYTHONPATH": str(CLIENT_ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def test_ddp_example_with_two_processes(address, job_id):
    steps = 3
    run = run_example("ddp_ghm.py", address, job_id, steps)
    assert run.stdout.count("every rank got the same table: yes") == steps, run.stdout
    assert "NO" not in run.stdout
    shared = re.findall(r"ghmd, every rank :(.*)", run.stdout)
    local = [re.findall(rf"local, rank {rank}\s*:(.*)", run.stdout) for rank in (0, 1)]
    assert len(shared) == len(local[0]) == len(local[1]) == steps
    # The ranks draw different shards: their own densities disagree, the shared one is one.
    assert local[0] != local[1]


def test_ddp_seesaw_example_with_two_processes(address, job_id):
    """examples/ddp_seesaw.py: every rank weighs with the same cum_samples, the sum of what
    the ranks' own (local) counts are, which differ from rank to rank."""
    steps = 3
    run = run_example("ddp_seesaw.py", address, job_id, steps)
    assert run.stdout.count("every rank weighs with the same counts: yes") == steps, run.stdout
    assert "NO" not in run.stdout

    def rows(pattern):
        return [[int(v) for v in line.split()] for line in re.findall(pattern, run.stdout)]

    shared = rows(r"ghmd, every rank :(.*)")
    local = [rows(rf"local, rank {rank}\s*:(.*)") for rank in (0, 1)]
    assert len(shared) == len(local[0]) == len(local[1]) == steps
    for step in range(steps):
        assert shared[step] == [a + b for a, b in zip(local[0][step], local[1][step])], step
    assert local[0] != local[1]
