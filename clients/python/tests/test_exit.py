"""A training process that exits with streams open (issue 13): its streams and channels are
closed at interpreter exit by the client itself (weakref finalizers), not left to grpc's __del__,
whether the server is still up or was killed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import CLIENT_ROOT, Server

TRAINER = textwrap.dedent("""
    import atexit
    import sys

    def report():
        # Registered before any stream exists, so it runs after the client's own exit handler.
        for name, stream in (("client", session), ("loss", loss._session)):
            call = stream._responses
            print(name, "stream ended:", call is None or call.done(), flush=True)

    atexit.register(report)

    import torch
    from ghmd import Client
    from ghmd.torch import GHMC

    address, job_id, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"
    client = Client(address, retries=0)
    client.create_job(job_id + "/client", "ghm_c", 10)
    session = client.stream()
    session.harmonize_histogram(job_id + "/client", [1] + [0] * 9, 1.0)
    loss = GHMC(bins=10, momentum=0.75, job_id=job_id + "/loss", address=address)
    loss(torch.randn(50, 4), torch.zeros(50, 4), torch.ones(50, 4))
    print("streams open", flush=True)
    sys.stdin.readline()  # the test kills the server now, or leaves it up
    # ... and the process ends without closing anything, as a crashed training script does
""")


def run_trainer(tmp_path, job_id, kill: bool):
    server = Server(tmp_path / "ghmd.log")
    trainer = None
    try:
        server.wait_serving()
        trainer = subprocess.Popen(
            [sys.executable, "-c", TRAINER, server.address, job_id, "kill" if kill else "live"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(CLIENT_ROOT / "src")},
        )
        assert trainer.stdout.readline().strip() == "streams open", trainer.stderr.read()
        if kill:
            server.process.kill()
            server.process.wait()
        trainer.stdin.write("\n")
        trainer.stdin.flush()
        # A bound on a hang, not a timing: a process that exits does so within a second or two.
        stdout, stderr = trainer.communicate(timeout=60)
        assert trainer.returncode == 0, stderr
        return stdout.splitlines()
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        server.stop()


def test_open_streams_are_ended_at_exit(tmp_path, job_id):
    assert run_trainer(tmp_path, job_id, kill=False) == [
        "client stream ended: True", "loss stream ended: True"]


def test_a_process_with_open_streams_exits_after_the_server_was_killed(tmp_path, job_id):
    assert run_trainer(tmp_path, job_id, kill=True) == [
        "client stream ended: True", "loss stream ended: True"]
