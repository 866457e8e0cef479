"""A ghmd on this machine, for examples and benchmarks that start their own: a free loopback
port to give it, and a wait until it answers."""

from __future__ import annotations

import socket
import time

from .client import Client
from .errors import GhmdError


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(address: str, timeout: float = 30.0) -> None:
    """Returns once the server at ``address`` answers a call; raises its last error after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with Client(address, retries=0, timeout=1.0) as client:
        while True:
            try:
                list(client.list_jobs(page_size=1))
                return
            except GhmdError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
