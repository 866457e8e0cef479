"""Fixtures: a real ghmd server for the whole session, and clients of it.

The server is the release binary (``GHMD_BIN``, default ``target/release/ghmd``; scripts/test.sh
builds it), started on a free loopback port and awaited through the standard gRPC health check.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

TESTS = Path(__file__).resolve().parent
CLIENT_ROOT = TESTS.parent
REPO_ROOT = CLIENT_ROOT.parent.parent
CONFORMANCE = REPO_ROOT / "tests" / "data" / "conformance"

sys.path.insert(0, str(TESTS))  # mmdet_port, shared by the tests and the benchmark


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RUN_TAKEOVER_AFTER = 2


def ghmd_binary() -> Path:
    binary = Path(os.environ.get("GHMD_BIN", REPO_ROOT / "target" / "release" / "ghmd"))
    if not binary.is_file():
        pytest.exit(f"no ghmd binary at {binary}: run `cargo build --release` first", returncode=1)
    return binary


class Server:
    """A ghmd process on 127.0.0.1:<port>, stopped with SIGTERM. A run may take over a job
    whose old run has been quiet for RUN_TAKEOVER_AFTER seconds (120 s by default: too long
    for a test of two runs in a row)."""

    def __init__(self, log_path: Path, *extra_args: str, credentials=None) -> None:
        self.credentials = credentials
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [str(ghmd_binary()), "serve", "--listen", self.address, "--shutdown-grace", "3s",
             "--in-memory", "--metrics-listen", "127.0.0.1:0",
             "--run-takeover-after", f"{RUN_TAKEOVER_AFTER}s", *extra_args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        if self.credentials is None:
            channel = grpc.insecure_channel(self.address)
        else:
            channel = grpc.secure_channel(self.address, self.credentials)
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"ghmd exited with {self.process.returncode}: {self.log_path.read_text()}"
                    )
                try:
                    reply = health.Check(
                        health_pb2.HealthCheckRequest(service="ghm.v1.Harmonizer"), timeout=1.0
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ghmd at {self.address} not SERVING after {timeout}s")
                time.sleep(0.05)

    def stop(self) -> int:
        self.process.terminate()
        try:
            code = self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code


@pytest.fixture(scope="session")
def ghmd_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("ghmd") / "ghmd.log")
    try:
        server.wait_serving()
        yield server
    finally:
        code = server.stop()
    assert code == 0, f"ghmd did not exit cleanly ({code}): {server.log_path.read_text()}"


@pytest.fixture(scope="session")
def address(ghmd_server) -> str:
    return ghmd_server.address


@pytest.fixture
def client(address):
    from ghmd import Client

    with Client(address) as client:
        yield client


@pytest.fixture
def job_id(request) -> str:
    """A job id of its own for each test, so tests never share state on the one server."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:60]
    return f"pytest/{name}/{uuid.uuid4().hex[:12]}"


def conformance_cases():
    # The GHM cases; seesaw_*.json and eqlv2_*.json beside them have other shapes.
    return sorted(CONFORMANCE.glob("ghm*.json"))


def load_case(path: Path) -> dict:
    return json.loads(path.read_text())
